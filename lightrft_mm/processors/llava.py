"""LLaVA-1.5 and LLaVA-NeXT adapters: Samples -> `input_ids` + `pixel_values` (+ `image_sizes`).

Both render the chat template (one `<image>` per image part), check that the placeholders in
the rendered prompt match the sample's image parts, and let the HF processor expand each
placeholder into the image's feature tokens. LLaVA-NeXT tiles each image at the best of the
model's `image_grid_pinpoints` ("any-res"): its `pixel_values` are [images, tiles, 3, H, W],
and the number of tiles depends on the image's shape. Each prompt's tiles are padded here to
the most tiles any image can get, so prompts concatenate along the image axis whatever their
shapes; the model reads the real tile count of each image from `image_sizes` and never looks
at the padding.
"""

from __future__ import annotations

import math

import torch

from lightrft_mm.errors import MediaError
from lightrft_mm.processors.adapter import TOKEN_ALIGNED, HFChatAdapter, PromptEncoding, to_hf_messages
from lightrft_mm.processors.image import load_image
from lightrft_mm.schema import Sample


def check_placeholders(sample: Sample, text: str, token: str, kind: str) -> None:
    """Raise MediaError unless `text` holds exactly one `token` per `kind` part of `sample`.

    Args:
        sample: the sample the prompt was rendered from (named in the error).
        text: the rendered prompt.
        token: the placeholder the chat template writes for each part (e.g. "<image>").
        kind: the media part type ("image", "audio").
    """
    found, parts = text.count(token), len(sample.media(kind))
    if found != parts:
        raise MediaError(
            f"sample {sample.id}: the rendered prompt holds {found} '{token}' placeholder(s) but the "
            f"sample has {parts} {kind} part(s); the model needs one per {kind}. The chat template "
            f"writes one for each {kind} part, so the extra ones come from the text. Fix: remove "
            f"'{token}' from the sample's text parts and give each {kind} its own part.")


def render_prompt(adapter: HFChatAdapter, sample: Sample) -> str:
    """The sample's chat, rendered with the processor's template, ending with the assistant turn."""
    return adapter.processor.apply_chat_template(
        to_hf_messages(sample, adapter.system_prompt), add_generation_prompt=True, tokenize=False)


def split_outputs(out, raw: dict | None = None) -> PromptEncoding:
    """One-prompt processor output (and the media it was given, by kind) -> PromptEncoding."""
    aligned = {k: out[k][0] for k in TOKEN_ALIGNED if k in out}
    media = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask") and k not in aligned}
    return PromptEncoding(out["input_ids"][0], aligned, media, raw or {})


class LlavaAdapter(HFChatAdapter):
    """LLaVA-1.5: each image becomes one fixed-size square and a fixed number of tokens.

    Args:
        processor: a `LlavaProcessor` (or `LlavaNextProcessor`) with a chat template.
        system_prompt, image, video, audio: as for `HFChatAdapter`.
    """

    def __init__(self, processor, **kwargs):
        super().__init__(processor, **kwargs)
        self.modalities = frozenset({"image"})
        self.image_token = getattr(processor, "image_token", "<image>")

    def encode_one(self, sample: Sample) -> PromptEncoding:
        """Render, check placeholders, load the images and run the processor for one sample.

        Raises:
            MediaError: the sample has video/audio parts, its placeholders do not match its
                image parts, or an image cannot be read; the message names the sample.
        """
        if sample.media("video") or sample.media("audio"):
            raise MediaError(f"sample {sample.id}: {type(self).__name__} takes text and image parts only; "
                             "this sample has video/audio parts. Fix: use a model with those modalities "
                             "(e.g. tiny:qwen2_audio for audio) or drop the parts.")
        text = render_prompt(self, sample)
        check_placeholders(sample, text, self.image_token, "image")
        images = [load_image(p.image, where=f"sample {sample.id}", max_pixels_guard=self.image_cfg.max_pixels_guard)
                  for p in sample.media("image")]
        if not images:
            return split_outputs(self.tokenizer([text], return_tensors="pt", add_special_tokens=False))
        return self.finish(split_outputs(self.processor(text=[text], images=images, return_tensors="pt"),
                                         {"image": images}))

    def finish(self, encoding: PromptEncoding) -> PromptEncoding:
        """Hook for family-specific fixes of a prompt's media tensors (none for LLaVA-1.5)."""
        return encoding


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (any-res): `pixel_values` [images, max_tiles, 3, H, W] and `image_sizes` [images, 2].

    Args:
        processor: a `LlavaNextProcessor` whose image processor has `image_grid_pinpoints`.
        system_prompt, image, video, audio: as for `HFChatAdapter`.
    """

    def finish(self, encoding: PromptEncoding) -> PromptEncoding:
        """Pad the tile axis of `pixel_values` to `max_tiles` with zeros."""
        pixels = encoding.media["pixel_values"]
        tiles = self.max_tiles(tuple(pixels.shape[-2:]))
        if pixels.shape[1] < tiles:
            pad = pixels.new_zeros((pixels.shape[0], tiles - pixels.shape[1], *pixels.shape[2:]))
            encoding.media["pixel_values"] = torch.cat([pixels, pad], dim=1)
        return encoding

    def max_tiles(self, tile_hw: tuple[int, int]) -> int:
        """Most tiles any image can get: the base tile plus the largest pinpoint grid."""
        pinpoints = self.processor.image_processor.image_grid_pinpoints
        th, tw = tile_hw
        return 1 + max(math.ceil(h / th) * math.ceil(w / tw) for h, w in pinpoints)


__all__ = ["LlavaAdapter", "LlavaNextAdapter", "check_placeholders", "render_prompt", "split_outputs"]

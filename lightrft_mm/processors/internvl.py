"""InternVL3 adapter (transformers' `InternVLForConditionalGeneration`, the `-hf` checkpoints).

Images are cut into dynamic tiles by the GotOcr2 image processor (`crop_to_patches`): the tile
grid whose aspect ratio is closest to the image's, between `min_patches` and `max_patches`
tiles, plus one thumbnail tile of the whole image when the grid has more than one tile. Every
tile gives the same number of visual tokens (`image_seq_length`), so the chat template's one
`<IMG_CONTEXT>` per image part becomes `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) +
`</img>`, as `InternVLProcessor` writes it. `pixel_values` are [tiles, 3, H, W]: the tiles of
all a prompt's images in prompt order, so `collate` concatenates prompts along the tile axis
and images of different shapes (different tile counts) share a batch without padding. The
text model is Qwen2 with plain 1-D positions: nothing is aligned with the tokens.

Video: InternVL takes a video as frames, each frame one tile (see `InternVLAdapter`); its
video processor needs torchvision, so the frames are sampled by `lightrft_mm.processors.video`
and the prompt is expanded here. Audio parts are refused.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from lightrft_mm.errors import MediaError
from lightrft_mm.processors.adapter import HFChatAdapter, PromptEncoding, load_image
from lightrft_mm.processors.llava import check_placeholders, render_prompt, split_outputs
from lightrft_mm.processors.video import load_video
from lightrft_mm.schema import Part, Sample

CONTEXT_TOKEN = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
# The tokenizer's named tokens, as the -hf checkpoints' tokenizer_config.json names them.
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": CONTEXT_TOKEN, "video_token": VIDEO_TOKEN}


@lru_cache(maxsize=None)
def internvl_image_processor_class():
    """Return `InternVLImageOnlyProcessor`: `InternVLProcessor` without its video processor.

    transformers' InternVL video processor imports torchvision, which has no wheel for the CPU
    torch pinned here; for text and image prompts this class gives exactly the stock
    processor's tokens and `pixel_values` (it inherits `__call__`). It saves itself as
    `InternVLProcessor`, so `AutoProcessor` loads the folder wherever torchvision exists.
    """
    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class InternVLImageOnlyProcessor(InternVLProcessor):
        """`InternVLProcessor` for images and text (no `video_processor`)."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256,
                     chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_seq_length = image_seq_length
            self.start_image_token = tokenizer.start_image_token
            self.end_image_token = tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token = tokenizer.context_image_token
            self.video_token = tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

        def to_dict(self):
            return {**super().to_dict(), "processor_class": "InternVLProcessor"}

    return InternVLImageOnlyProcessor


class InternVLAdapter(HFChatAdapter):
    """Adapter of InternVL3 (`model_type` "internvl"): text, images and videos, several per prompt.

    The prompt is expanded here as `InternVLProcessor` expands it (a test holds the two equal on
    image prompts), so videos work without its torchvision video processor: each sampled frame
    is one tile (resized, not cropped), written `FrameK: <img>` + `<IMG_CONTEXT>` x (tokens per
    tile) + `</img>`, the frames joined by newlines.

    Args:
        processor: an `InternVLProcessor` (or the image-only variant above) with its chat template.
        system_prompt, image, video, audio: as for `HFChatAdapter`; `video` gives the decoder
            backend and the default fps / max_frames (a part's own `fps` / `max_frames` win).
    """

    def __init__(self, processor, **kwargs):
        super().__init__(processor, **kwargs)
        self.modalities = frozenset({"image", "video"})
        self.image_processor = processor.image_processor
        self.image_token = getattr(processor, "image_token", CONTEXT_TOKEN)
        self.video_token = getattr(processor, "video_token", VIDEO_TOKEN)
        self.start_token = getattr(processor, "start_image_token", "<img>")
        self.end_token = getattr(processor, "end_image_token", "</img>")
        self.tokens_per_tile = int(processor.image_seq_length)
        self._placeholders = re.compile(f"{re.escape(self.image_token)}|{re.escape(self.video_token)}")

    def encode_one(self, sample: Sample) -> PromptEncoding:
        """Render, check placeholders, tile the images, sample the videos' frames for one sample.

        Raises:
            MediaError: the sample has audio parts, its placeholders do not match its image /
                video parts, or a media file cannot be read; the message names the sample.
        """
        where = f"sample {sample.id}"
        if sample.media("audio"):
            raise MediaError(
                f"{where}: InternVL (tiny:internvl) takes text, image and video parts; this sample has audio "
                "part(s). Fix: use a family that takes audio (qwen2_audio), or drop the parts.")
        text = render_prompt(self, sample)
        check_placeholders(sample, text, self.image_token, "image")
        check_placeholders(sample, text, self.video_token, "video")
        images = [load_image(p.image, where=where, max_pixels_guard=self.image_cfg.max_pixels_guard)
                  for p in sample.media("image")]
        clips = [self.load_clip(p, where) for p in sample.media("video")]
        if not images and not clips:
            return split_outputs(self.tokenizer([text], return_tensors="pt", add_special_tokens=False))
        # Images tiled as InternVLProcessor has them tiled (its default crop_to_patches=True).
        tiles = {"image": iter([self.image_processor(images=[im], crop_to_patches=True,
                                                     return_tensors="pt")["pixel_values"] for im in images]),
                 "video": iter([self.image_processor(images=list(c.frames), crop_to_patches=False,
                                                     return_tensors="pt")["pixel_values"] for c in clips])}
        pixels = []

        def expand(match) -> str:
            kind = "image" if match.group(0) == self.image_token else "video"
            pixels.append(next(tiles[kind]))
            if kind == "image":
                return self._span(pixels[-1].shape[0])
            return "\n".join(f"Frame{i + 1}: {self._span(1)}" for i in range(pixels[-1].shape[0]))

        text = self._placeholders.sub(expand, text)
        ids = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        raw = {k: v for k, v in (("image", images), ("video", [c.frames for c in clips])) if v}
        return PromptEncoding(ids, {}, {"pixel_values": torch.cat(pixels)}, raw)

    def _span(self, tiles: int) -> str:
        return self.start_token + self.image_token * self.tokens_per_tile * tiles + self.end_token

    def load_clip(self, part: Part, where: str):
        """Decode a video part with its own fps / max_frames / start / end, else the config's."""
        return load_video(part.video, fps=part.fps or self.video_cfg.fps,
                          max_frames=part.max_frames or self.video_cfg.max_frames, start=part.start,
                          end=part.end, backend=self.video_cfg.backend, temporal_patch=1, where=where)


__all__ = ["CONTEXT_TOKEN", "NAMED_TOKENS", "VIDEO_TOKEN", "InternVLAdapter", "internvl_image_processor_class"]

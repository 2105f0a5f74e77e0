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

Video: InternVL takes a video as frames, each one tile; its video processor needs torchvision
and this adapter does not build those frames, so video (and audio) parts are refused.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lightrft_mm.errors import MediaError
from lightrft_mm.processors.adapter import HFChatAdapter, PromptEncoding, load_image
from lightrft_mm.processors.llava import check_placeholders, render_prompt, split_outputs
from lightrft_mm.schema import Sample

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
    """Adapter of InternVL3 (`model_type` "internvl"): text and images, several per prompt.

    Args:
        processor: an `InternVLProcessor` (or the image-only variant above) with its chat template.
        system_prompt, image, video, audio: as for `HFChatAdapter`.
    """

    def __init__(self, processor, **kwargs):
        super().__init__(processor, **kwargs)
        self.modalities = frozenset({"image"})
        self.image_token = getattr(processor, "image_token", CONTEXT_TOKEN)
        self.video_token = getattr(processor, "video_token", VIDEO_TOKEN)

    def encode_one(self, sample: Sample) -> PromptEncoding:
        """Render, check placeholders, load the images and tile them for one sample.

        Raises:
            MediaError: the sample has video/audio parts, its placeholders do not match its image
                parts, or an image cannot be read; the message names the sample.
        """
        kinds = [k for k in ("video", "audio") if sample.media(k)]
        if kinds:
            raise MediaError(
                f"sample {sample.id}: InternVL (tiny:internvl) takes text and image parts only; this sample "
                f"has {' and '.join(kinds)} part(s). Fix: use a family that takes them (video: qwen2_vl, "
                "qwen2_5_vl; audio: qwen2_audio), or drop the parts.")
        text = render_prompt(self, sample)
        check_placeholders(sample, text, self.image_token, "image")
        if self.video_token in text:
            raise MediaError(
                f"sample {sample.id}: its text holds '{self.video_token}', InternVL's video placeholder, "
                "and this adapter takes no video. Fix: remove it from the sample's text parts.")
        images = [load_image(p.image, where=f"sample {sample.id}", max_pixels_guard=self.image_cfg.max_pixels_guard)
                  for p in sample.media("image")]
        if not images:
            return split_outputs(self.tokenizer([text], return_tensors="pt", add_special_tokens=False))
        return split_outputs(self.processor(text=[text], images=images, return_tensors="pt"), {"image": images})


__all__ = ["CONTEXT_TOKEN", "NAMED_TOKENS", "VIDEO_TOKEN", "InternVLAdapter", "internvl_image_processor_class"]

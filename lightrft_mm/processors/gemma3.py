"""Gemma 3 adapter: Samples -> `input_ids`, `token_type_ids` and `pixel_values`.

The chat template writes one `<start_of_image>` per image part; `Gemma3Processor` expands each
to `\\n\\n<start_of_image>` + `mm_tokens_per_image` soft tokens + `<end_of_image>\\n\\n`, resizes
the image to the vision tower's square (no pan-and-scan) and marks the soft tokens in
`token_type_ids` (1 image, 0 text). The model lets each image's soft tokens attend to each other
both ways; the training forward gets the same `token_type_ids`, extended with zeros over the
completion (`TOKEN_ALIGNED`), so it builds the mask generation used. Text-only prompts carry
zeros, so every row of a mixed batch goes through the same mask path. `pixel_values` are
[images, 3, H, W], concatenated across prompts in prompt order (the order the model reads them).
"""

from __future__ import annotations

import torch

from lightrft_mm.errors import MediaError
from lightrft_mm.processors.adapter import HFChatAdapter, PromptEncoding
from lightrft_mm.processors.image import load_image
from lightrft_mm.processors.llava import check_placeholders, render_prompt, split_outputs
from lightrft_mm.schema import Sample

# Families of this toolkit that take what Gemma 3 does not (named in the error).
OTHER_MODALITIES = {"video": "tiny:qwen2_vl, tiny:qwen2_5_vl (Qwen2-VL family)",
                    "audio": "tiny:qwen2_audio (Qwen2-Audio)"}


class Gemma3Adapter(HFChatAdapter):
    """Adapter of Gemma 3 (`Gemma3ForConditionalGeneration`): text and images, several per prompt.

    Args:
        processor: a `Gemma3Processor` with a chat template.
        system_prompt, image, video, audio: as for `HFChatAdapter`.
    """

    def __init__(self, processor, **kwargs):
        super().__init__(processor, **kwargs)
        self.modalities = frozenset({"image"})
        self.image_marker = self.tokenizer.boi_token  # what the template writes per image part

    def encode_one(self, sample: Sample) -> PromptEncoding:
        """Render, check placeholders, load the images and run the processor for one sample.

        Raises:
            MediaError: the sample has video or audio parts, its `<start_of_image>` markers do
                not match its image parts, or an image cannot be read; the message names the sample.
        """
        for kind, families in OTHER_MODALITIES.items():
            if sample.media(kind):
                raise MediaError(
                    f"sample {sample.id}: Gemma 3 takes text and image parts only, and this sample has "
                    f"{len(sample.media(kind))} {kind} part(s). Fix: drop the {kind} parts, or use a model "
                    f"that takes {kind}: {families}.")
        text = render_prompt(self, sample)
        check_placeholders(sample, text, self.image_marker, "image")
        images = [load_image(p.image, where=f"sample {sample.id}", max_pixels_guard=self.image_cfg.max_pixels_guard)
                  for p in sample.media("image")]
        if not images:
            out = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
            ids = out["input_ids"][0]
            return PromptEncoding(ids, {"token_type_ids": torch.zeros_like(ids)})
        out = self.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
        return split_outputs(out, {"image": images})


__all__ = ["Gemma3Adapter"]

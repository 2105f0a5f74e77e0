"""Qwen3.5 adapter: text and images (several per prompt) for the hybrid linear-attention model.

Qwen3.5 writes images as Qwen2-VL does (`<|vision_start|><|image_pad|><|vision_end|>`, the pad
expanded to grid t*h*w / merge^2 tokens, `mm_token_type_ids` 1 on them), so the prompt is built
by `QwenVLAdapter`; the image processor carries Qwen3.5's 16-pixel patches. Videos are refused:
Qwen3.5 (like Qwen3-VL) writes a `<t seconds>` text timestamp before each frame's tokens and
splits the video grid per frame, which the Qwen2-VL prompt builder does not do.

Padding-free packing (trainer.padding_free) is refused (`check_padding_free`): the torch
fallback of the Gated DeltaNet layers runs each row's convolution and recurrent state over the
whole packed sequence, so rows would leak into each other without the fla / causal-conv1d
varlen kernels.
"""

from __future__ import annotations

from lightrft_mm.errors import ConfigError, MediaError
from lightrft_mm.processors.adapter import PromptEncoding
from lightrft_mm.processors.qwen_vl import QwenVLAdapter
from lightrft_mm.schema import Sample

VIDEO_FAMILIES = "tiny:qwen2_vl, tiny:qwen2_5_vl"


class Qwen3_5Adapter(QwenVLAdapter):
    """Adapter of Qwen3.5 (`Qwen3_5ForConditionalGeneration`, DESIGN.md §4 `ModelAdapter`).

    Args:
        processor: a processor with a Qwen2-VL style `image_processor` (Qwen3.5: patch 16),
            `tokenizer` and chat template.
        system_prompt, image, video, audio: as `QwenVLAdapter`.
    """

    model_type = "qwen3_5"

    def __init__(self, processor, *, system_prompt: str | None = None, image=None, video=None, audio=None):
        super().__init__(processor, system_prompt=system_prompt, image=image, video=video, audio=audio,
                         model_type="qwen3_5")
        self.modalities = frozenset({"image"})

    def encode_one(self, sample: Sample) -> PromptEncoding:
        """One Sample -> token ids, `mm_token_type_ids` and its images' tensors.

        Raises:
            MediaError: the sample holds video or audio, an image cannot be read, or the
                placeholders of the prompt do not match its images (names the sample).
        """
        for kind, families in (("video", VIDEO_FAMILIES), ("audio", "tiny:qwen2_audio")):
            if sample.media(kind):
                raise MediaError(f"sample {sample.id}: has {kind} parts, which the Qwen3.5 adapter does not take "
                                 f"(it takes text and images). Fix: drop the {kind} rows for this model, or train "
                                 f"a family that takes {kind} ({families}).")
        return super().encode_one(sample)


PADDING_FREE_MESSAGE = (
    "trainer.padding_free=true cannot run Qwen3.5 (model_type qwen3_5): its Gated DeltaNet "
    "linear-attention layers (config.text_config.layer_types) carry a convolution and a recurrent "
    "state along the sequence, and without the fla / causal-conv1d varlen kernels the packed rows "
    "would flow into each other. Fix: set trainer.padding_free=false for this model."
)


def check_padding_free(model, padding_free: bool) -> None:
    """Refuse padding-free packing for a model with linear-attention layers.

    Args:
        model: the HF model (only its config is read).
        padding_free: the value of trainer.padding_free.

    Raises:
        ConfigError: padding_free is on and the text model has a "linear_attention" layer.
    """
    if padding_free and has_linear_attention(model.config):
        raise ConfigError(PADDING_FREE_MESSAGE)


def has_linear_attention(config) -> bool:
    """True when the (text) config lists a "linear_attention" layer."""
    text = getattr(config, "text_config", None) or config
    return "linear_attention" in (getattr(text, "layer_types", None) or ())


__all__ = ["PADDING_FREE_MESSAGE", "Qwen3_5Adapter", "check_padding_free", "has_linear_attention"]

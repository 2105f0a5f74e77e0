"""Qwen3.5 adapter: text, images (several per prompt) and videos for the hybrid linear-attention model.

Qwen3.5's vision path and prompt format are Qwen3-VL's (`Qwen3VLProcessor` is its processor):
an image pad expands to grid t*h*w / merge^2 pads, a video pad to a `<t seconds>` text timestamp
and the frame's vision tokens per temporal patch, with `mm_token_type_ids` 1 / 2 on the pads for
the interleaved M-RoPE index. So the prompt is built by `Qwen3VLAdapter`; this class only names
the model (in its errors: audio parts are refused, as by Qwen3-VL).

Left padding is safe: transformers' Gated DeltaNet multiplies the hidden states of padded
positions by the 2-D attention mask (`apply_mask_to_padding_states`) before its bias-free
projections, so a pad adds zero keys and values to the convolution window and the recurrent
state (tests: a prompt gives the same greedy tokens and log-probs alone and under ~250 pads).

Padding-free packing (trainer.padding_free) is refused by `validate` (LINEAR_ATTENTION_MODEL_TYPES): the torch
fallback of the Gated DeltaNet layers runs its convolution and recurrent state over the whole
packed sequence, so rows would leak into each other without the fla / causal-conv1d varlen
kernels.
"""

from __future__ import annotations

from lightrft_mm.processors.qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Adapter of Qwen3.5 (`Qwen3_5ForConditionalGeneration`, DESIGN.md §4 `ModelAdapter`).

    Args:
        processor: a Qwen3-VL style processor (`image_processor` with Qwen3.5's 16-pixel
            patches, `tokenizer`, chat template).
        system_prompt, image, video, audio: as `Qwen3VLAdapter`.
        model_type: recorded for error messages (default "qwen3_5").
    """

    model_type = "qwen3_5"
    family_name = "Qwen3.5"


# Model types whose text layers include Gated DeltaNet linear attention: `validate` refuses
# trainer.padding_free for them (no varlen kernels on the torch fallback: packed rows would share
# one convolution window and recurrent state).
LINEAR_ATTENTION_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")


__all__ = ["LINEAR_ATTENTION_MODEL_TYPES", "Qwen3_5Adapter"]

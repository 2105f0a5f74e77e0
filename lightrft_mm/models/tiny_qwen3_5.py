"""`tiny:qwen3_5`: a small Qwen3.5 (`Qwen3_5ForConditionalGeneration`), built offline.

Qwen3.5's text model is a hybrid: most decoder layers are Gated DeltaNet linear attention (a
causal depthwise convolution and a gated delta-rule recurrent state), every fourth one gated
full attention with interleaved M-RoPE; its vision tower is Qwen3-VL's (16-pixel patches, 2x2
merge, learned position grid). The tiny model keeps both layer kinds (one linear-attention
layer, then one full-attention layer) and transformers' torch fallbacks run them (no fla /
causal-conv1d kernels on CPU).

The processor is Qwen3.5's real one, `Qwen3VLProcessor`, without its video processor (which
needs torchvision; `lightrft_mm.models.processing.qwen3_vl_image_processor_class`), with Qwen3-VL's
chat template: an image part is `<|vision_start|><|image_pad|><|vision_end|>`, the pad expanded to
the image's merged-token count (grid t*h*w / 4); videos get their per-frame text timestamps from
the adapter (`lightrft_mm.processors.qwen3_5.Qwen3_5Adapter`).
"""

from __future__ import annotations

# No tokens beyond the shared Qwen ones: Qwen3.5 uses the same vision markers and pads.
SPECIAL_TOKENS: list[str] = []

PATCH = 16  # Qwen3-VL / Qwen3.5 vision patch (Qwen2-VL: 14)
MERGE = 2
# The vision tower's learned position grid is num_position_embeddings = side^2 (real: 48^2),
# resampled bilinearly to each image's patch grid.
POSITION_GRID_SIDE = 8
LAYER_TYPES = ["linear_attention", "full_attention"]
# At the default std 0.02 the merger's output layer makes visual tokens no larger than text
# embeddings. Measured on the colour demo (recipes/demo/colors.yaml, seed 0): held-out accuracy
# 0.50 after the 150 GRPO steps (chance until step ~90) at 0.02, 0.75 at 0.2, and 1.00 from step
# 75 on at 0.5.
MERGER_STD = 0.5


def image_side(image_size: int) -> int:
    """The square side images are resized to: as many merged tokens per side as Qwen2-VL gets
    from `image_size` (84 -> 3, i.e. 96 pixels here: 9 visual tokens per image)."""
    tokens = max(1, image_size // (14 * MERGE))
    return tokens * PATCH * MERGE


def build(tok, text: dict, image_size: int):
    """Build `(Qwen3_5ForConditionalGeneration, processor)`.

    Args:
        tok: the tiny tokenizer (with the Qwen vision special tokens).
        text: the shared small text-model sizes (hidden 64, 2 layers, 2 heads, ...).
        image_size: Qwen2-VL-equivalent image side; see `image_side`.

    Returns:
        (model, image-only `Qwen3VLProcessor` with Qwen3-VL's chat template).
    """
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lightrft_mm.models.processing import qwen3_vl_image_processor_class
    from lightrft_mm.models.tiny_qwen3_vl import CHAT_TEMPLATE

    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # Rotary on half of each head (real: a quarter of 256); the rotary half-dimension (8) is
    # split over temporal / height / width like the real [11, 11, 10] of 32: [3, 3, 2].
    rotary = 0.5
    half = int(head_dim * rotary) // 2
    width = half // 3
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary,
            "mrope_interleaved": True, "mrope_section": [(half - width + 1) // 2, (half - width) // 2, width]}
    text_config = dict(text, head_dim=head_dim, layer_types=LAYER_TYPES, num_hidden_layers=len(LAYER_TYPES),
                       rope_parameters=rope, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                  num_position_embeddings=POSITION_GRID_SIDE ** 2)
    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    config = Qwen3_5Config(text_config=text_config, vision_config=vision, tie_word_embeddings=False, **ids)
    model = Qwen3_5ForConditionalGeneration(config)
    torch.nn.init.normal_(model.model.visual.merger.linear_fc2.weight, std=MERGER_STD)
    pixels = image_side(image_size) ** 2
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=PATCH,
                                               merge_size=MERGE, temporal_patch_size=2,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = qwen3_vl_image_processor_class()(image_processor=image_processor, tokenizer=tok,
                                                 chat_template=CHAT_TEMPLATE)
    return model, processor

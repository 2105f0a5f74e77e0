"""`tiny:qwen3_vl`: a small random-initialised `Qwen3VLForConditionalGeneration` (the class of
Qwen/Qwen3-VL-8B-Instruct) with a processor that works without torchvision.

What is kept from the released checkpoints: the architecture (Qwen3 text layers with q/k norms,
interleaved M-RoPE, a vision tower of patch size 16 with learned position embeddings resampled
to each grid, DeepStack mergers that add vision features of intermediate vision layers to the
first text layers), the special tokens, the image processor (Qwen2-VL's, patch size 16, mean and
std 0.5) and the Instruct chat template. What is small: 2 text layers of width 64, 2 vision
layers of width 32, a BPE tokenizer of a few hundred tokens, and an image budget that gives an
84 x 84 image 3 x 3 = 9 visual tokens (as the tiny Qwen2.5-VL has).

Videos are not processed by this processor (Qwen3-VL's video processor needs torchvision):
`lightrft_mm.processors.qwen3_vl.Qwen3VLAdapter` builds video prompts, with their text
timestamps, by hand.
"""

from __future__ import annotations

from lightrft_mm.models.processing import qwen3_vl_image_processor_class
from lightrft_mm.models.tiny import QWEN_CHAT_TEMPLATE

SPECIAL_TOKENS: list[str] = []  # Qwen3-VL's vision tokens are the shared Qwen ones
# The words of video timestamps ("<0.5 seconds>"), so a timestamp is a few BPE tokens.
EXTRA_CORPUS = "\n".join(f"<{t / 2:.1f} seconds>" for t in range(0, 40)) + "\nseconds second frame\n"

# Qwen3-VL-Instruct's chat template for text, image and video parts (no default system turn;
# tools and the Thinking variant's reasoning are left out) is the Qwen2-VL one.
CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE

PATCH = 16
MERGE = 2
VISION_WIDTH = 32
VISION_DEPTH = 2
# Vision layers whose outputs DeepStack adds to the first text layers' outputs (Qwen3-VL-8B: [8, 16, 24]
# of 27 vision layers into text layers 0-2 of 36). One here: a feature added after the last of the 2
# text layers reaches only the visual positions' final states, which predict no token (measured: that
# merger got no gradient), so it would be a parameter that cannot train.
DEEPSTACK = [0]
# Learned vision positions on an 8 x 8 grid (the 8B model: 48 x 48), bilinearly resampled per image.
POSITION_GRID = 8


def build(tok, text: dict, image_size: int):
    """Build the tiny model and its processor.

    Args:
        tok: the BPE (or Qwen) tokenizer from `build_tokenizer`.
        text: the shared small text-model sizes (see `build_tiny`).
        image_size: an image of this side gives about (image_size / 28)^2 visual tokens.

    Returns:
        (Qwen3VLForConditionalGeneration, Qwen3VLImageOnlyProcessor).
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # Interleaved M-RoPE over head_dim / 2 frequencies, in the 8B model's proportions [24, 20, 20].
    third = round(head_dim // 2 * 20 / 64)
    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
            "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    text_config = dict(text, head_dim=head_dim, rope_parameters=rope, hidden_act="silu")
    vision = dict(depth=VISION_DEPTH, hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_heads=2,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                  out_hidden_size=text["hidden_size"], num_position_embeddings=POSITION_GRID ** 2,
                  deepstack_visual_indexes=DEEPSTACK)
    config = Qwen3VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=False, **ids)
    model = Qwen3VLForConditionalGeneration(config)
    side = max(1, round(image_size / 28)) * PATCH * MERGE  # 84 -> 96: a 3 x 3 grid of merged tokens
    image_processor = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=PATCH,
                                               merge_size=MERGE, temporal_patch_size=2,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = qwen3_vl_image_processor_class()(image_processor=image_processor, tokenizer=tok,
                                                 chat_template=CHAT_TEMPLATE)
    return model, processor


__all__ = ["CHAT_TEMPLATE", "EXTRA_CORPUS", "SPECIAL_TOKENS", "build"]

"""`tiny:internvl`: a small random-initialised `InternVLForConditionalGeneration` (InternVL3 -hf).

The real class with an InternViT vision tower of 2 layers (hidden 32), the pixel-shuffle
projector and a Qwen2 text model of the shared tiny sizes, with the tokenizer's named InternVL
tokens and the -hf chat template (`<IMG_CONTEXT>\\n` per image, `<video>\\n` per video).

Tiles: InternVL3 cuts an image into 448-pixel tiles of 14-pixel patches (256 tokens after the
0.5 pixel shuffle); here a tile is 2/3 of `image_size` (56 pixels for the default 84, 4x4
patches, so 2x2 = 4 tokens per tile) and an image gets 1 to `MAX_TILES` tiles plus the
thumbnail: an 84x84 image is 2x2 tiles + thumbnail (20 tokens), a 56x112 one 2x1 + thumbnail.
"""

from __future__ import annotations

from lightrft_mm.processors.internvl import NAMED_TOKENS, internvl_image_processor_class

SPECIAL_TOKENS = list(NAMED_TOKENS.values())
PATCH = 14
MAX_TILES = 4

# The template of the -hf checkpoints (transformers' convert_internvl_weights_to_hf.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)


def named_tokenizer(tok):
    """The same tokenizer with InternVL's named tokens (`tok.start_image_token`, `..._id`), which
    `InternVLProcessor` reads and `save_pretrained` writes to tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    named = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token, pad_token=tok.pad_token,
        additional_special_tokens=list(tok.extra_special_tokens), model_specific_special_tokens=dict(NAMED_TOKENS))
    named.padding_side = tok.padding_side
    return named


def build(tok, text: dict, image_size: int):
    """Build `(model, processor)` for `tiny:internvl`.

    Args:
        tok: the tiny BPE (or Qwen) tokenizer with `SPECIAL_TOKENS` added.
        text: the shared tiny Qwen2 text-model sizes.
        image_size: the side of the demo images; a tile is 2/3 of it, in whole patch pairs.

    Returns:
        (InternVLForConditionalGeneration, InternVLImageOnlyProcessor).
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = named_tokenizer(tok)
    tile = max(2 * PATCH, (2 * image_size // 3) // (2 * PATCH) * (2 * PATCH))  # even patch grid
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=tile, patch_size=PATCH)
    downsample = 0.5
    tokens_per_tile = int((tile // PATCH * downsample) ** 2)
    config = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**text).to_dict(),
                            image_token_id=tok.context_image_token_id, image_seq_length=tokens_per_tile,
                            downsample_ratio=downsample, tie_word_embeddings=text["tie_word_embeddings"])
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                               min_patches=1, max_patches=MAX_TILES)
    processor = internvl_image_processor_class()(image_processor=image_processor, tokenizer=tok,
                                                 image_seq_length=tokens_per_tile, chat_template=CHAT_TEMPLATE)
    return model, processor

"""`tiny:gemma3`: a small random Gemma 3 (`Gemma3ForConditionalGeneration`, the class of
google/gemma-3-4b-it) with a working `Gemma3Processor`, built offline without torchvision.

Like the released checkpoints: a SigLIP vision tower whose patch grid is average-pooled to
`mm_tokens_per_image` soft tokens, Gemma's scaled input embeddings (x sqrt(hidden)) tied to the
output head, QK-norm and sandwich norms, sliding-window layers (local RoPE base 10k) before a
global layer (base 1M, linear scaling 8), no logit soft-capping (Gemma 3 dropped it: both
`*_softcapping` stay None, as in the 4B config), and the bidirectional attention over each
image's soft tokens that `token_type_ids` turns on. The prompt is Gemma's chat format
(`<start_of_turn>user ... <end_of_turn>`, `<start_of_turn>model`, the system message folded into
the first user turn), each image part written `<start_of_image>` and expanded by the processor
to `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`; `<end_of_turn>` ends a turn
(EOS). Pan-and-scan stays off (the processor's default).

Sizes: 84x84 images, 14-pixel patches (6x6), pooled 2x2 -> 9 soft tokens per image; the
sliding window is 16 tokens, shorter than any prompt with an image (about 40 tokens), so the
sliding layer's mask and cache really cut.
"""

from __future__ import annotations

import torch

# The special tokens of Gemma 3's tokenizer that the chat format and the processor use.
BOS, PAD = "<bos>", "<pad>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = [BOS, PAD, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_SOFT]
EXTRA_CORPUS = """
user model user model
What color is the shape? Answer with one word. Describe this image in one word.
"""

SLIDING_WINDOW = 16
PATCH = 14
POOL = 2  # soft tokens per image: (image_size / PATCH / POOL) ** 2
# The projector's weight: transformers initialises it to zeros (a checkpoint overwrites it),
# which would keep the image out of a random model's logits and its vision tower's gradient at
# zero. At 0.02 (the initializer range) a projected image token has about the scale of a scaled
# text embedding (std ~0.1 vs 0.16).
PROJECTOR_STD = 0.02

# google/gemma-3-4b-it's chat template (roles must alternate; the system message is folded into
# the first user turn; text parts are trimmed; an image part is its `<start_of_image>` marker).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _gemma_tokens(tok) -> None:
    """Give the shared BPE tokenizer Gemma's named tokens: BOS, PAD, EOS = end of turn, and the
    image markers `Gemma3Processor` reads (`boi_token`, `eoi_token`, `image_token` and their ids),
    saved with the tokenizer so `AutoProcessor` rebuilds the processor from a checkpoint."""
    tok.bos_token, tok.pad_token, tok.eos_token = BOS, PAD, END_OF_TURN
    tok._set_model_specific_special_tokens({"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_SOFT})


def text_config(tok, text: dict) -> dict:
    """The shared small text sizes (Qwen2's keys) as Gemma3TextConfig's: head_dim and the query
    scale from the head count, one sliding-window and one global layer, Gemma's token ids."""
    heads = text["num_attention_heads"]
    head_dim = text["hidden_size"] // heads
    layers = text["num_hidden_layers"]
    # Gemma 3 puts one global layer after each run of sliding ones (5:1); two layers give 1:1.
    layer_types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return dict(
        vocab_size=len(tok), hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=text["num_key_value_heads"],
        head_dim=head_dim, query_pre_attn_scalar=head_dim, max_position_embeddings=text["max_position_embeddings"],
        rms_norm_eps=text["rms_norm_eps"], hidden_activation="gelu_pytorch_tanh",
        sliding_window=SLIDING_WINDOW, layer_types=layer_types,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def build(tok, text: dict, image_size: int):
    """Build the tiny Gemma 3 and its processor.

    Args:
        tok: the BPE tokenizer of `build_tokenizer`, holding SPECIAL_TOKENS (changed in place:
            Gemma's BOS / PAD / EOS and image tokens).
        text: the shared small text-model sizes (Qwen2 config keys).
        image_size: images are resized to this square (84 gives 9 soft tokens).

    Returns:
        (Gemma3ForConditionalGeneration, Gemma3Processor with Gemma's chat template).
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from lightrft_mm.errors import ModelError

    if image_size % (PATCH * POOL):
        raise ModelError(f"tiny:gemma3 needs an image size that is a multiple of {PATCH * POOL} "
                         f"(14-pixel patches pooled 2x2), got {image_size}. Fix: image_size=84.")
    _gemma_tokens(tok)
    tokens = (image_size // PATCH // POOL) ** 2
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=PATCH, vision_use_head=False,
                                layer_norm_eps=1e-6)
    config = Gemma3Config(text_config=text_config(tok, text), vision_config=vision.to_dict(),
                          mm_tokens_per_image=tokens, boi_token_index=tok.convert_tokens_to_ids(BOI),
                          eoi_token_index=tok.convert_tokens_to_ids(EOI),
                          image_token_index=tok.convert_tokens_to_ids(IMAGE_SOFT), tie_word_embeddings=True)
    model = Gemma3ForConditionalGeneration(config)
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=PROJECTOR_STD)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                              do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                image_seq_length=tokens)
    return model, processor

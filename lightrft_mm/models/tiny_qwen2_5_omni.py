"""`tiny:qwen2_5_omni`: a small Qwen2.5-Omni thinker (`Qwen2_5OmniThinkerForConditionalGeneration`).

The thinker is the text-generating half of Qwen2.5-Omni (the talker, its speech output, is not
built): a Qwen2.5-VL vision tower, a Whisper-like audio encoder and a Qwen2 language model with
M-RoPE. It reads text, images, videos, audio, and videos with their audio track interleaved.

The audio side mirrors `tiny:qwen2_audio`: 32 mel bins and a 2 s window (the feature extractor's
`chunk_length`), so one second of audio is 100 feature frames and 25 audio tokens; the encoder's
attention window (`n_window` = 100, chunks of 200 frames) is the real model's. Images are resized
to `image_size` squared pixels (84 -> 3x3 = 9 visual tokens), as `tiny:qwen2_5_vl` does.

The processor is `Qwen2_5OmniProcessor` without its video processor (which needs torchvision,
`lightrft_mm.processors.qwen_omni.Qwen2_5OmniNoVideoProcessor`);
`lightrft_mm.processors.qwen_omni.QwenOmniAdapter` builds the prompts, videos included, by hand.
"""

from __future__ import annotations

import torch

from lightrft_mm.models.tiny import AUDIO_CORPUS
from lightrft_mm.processors.qwen_omni import (AUDIO, AUDIO_BOS, AUDIO_EOS, IMAGE, VIDEO, VISION_BOS, VISION_EOS,
                                             Qwen2_5OmniNoVideoProcessor)

SPECIAL_TOKENS = [VISION_BOS, VISION_EOS, IMAGE, VIDEO, AUDIO_BOS, AUDIO, AUDIO_EOS]
EXTRA_CORPUS = AUDIO_CORPUS + "\nPicture 1: Video 1: Listen to the video. What do you hear and see?\n"

# Qwen2.5-Omni's chat template: ChatML with a default system turn; an image is
# <|vision_bos|><|IMAGE|><|vision_eos|>, a video <|vision_bos|><|VIDEO|><|vision_eos|> (its audio
# track, when used, goes inside: the processor replaces <|VIDEO|>), an audio
# <|audio_bos|><|AUDIO|><|audio_eos|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

AUDIO_MEL_BINS = 32
AUDIO_WINDOW_SECONDS = 2
N_WINDOW = 100  # the encoder attends within chunks of 2 * n_window feature frames (2 s), as the real one
# As tiny:qwen2_audio (see `_build_qwen2_audio` in tiny.py): at the default std 0.02 the two
# convolutions shrink the mel features far below the sinusoidal positions added after them, and
# the projected audio tokens are barely larger than text embeddings.
AUDIO_CONV_STD = 0.4
AUDIO_PROJECTOR_STD = 0.3


def build(tok, text: dict, image_size: int):
    """The tiny thinker and its processor (see the module docstring).

    Args:
        tok: the tokenizer `build_tokenizer` made with SPECIAL_TOKENS.
        text: the shared small text-model sizes (tiny.py).
        image_size: images are resized to this many pixels squared.

    Returns:
        (Qwen2_5OmniThinkerForConditionalGeneration, Qwen2_5OmniNoVideoProcessor).
    """
    from transformers import (Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration,
                              WhisperFeatureExtractor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = tok.convert_tokens_to_ids
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    third = head_dim // 2 // 4  # M-RoPE: temporal / height / width sections of the rotary half
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    text_config = dict(text, rope_parameters=rope)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    extractor = WhisperFeatureExtractor(feature_size=AUDIO_MEL_BINS, sampling_rate=16000, hop_length=160,
                                        chunk_length=AUDIO_WINDOW_SECONDS, n_fft=400)
    audio = dict(num_mel_bins=AUDIO_MEL_BINS, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                 d_model=32, max_source_positions=N_WINDOW, n_window=N_WINDOW, output_dim=text["hidden_size"])
    config = Qwen2_5OmniThinkerConfig(
        text_config=text_config, vision_config=vision, audio_config=audio,
        image_token_index=ids(IMAGE), video_token_index=ids(VIDEO), audio_token_index=ids(AUDIO),
        audio_start_token_id=ids(AUDIO_BOS), audio_end_token_id=ids(AUDIO_EOS),
        vision_start_token_id=ids(VISION_BOS), vision_end_token_id=ids(VISION_EOS),
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    tower = model.model.audio_tower
    for conv in (tower.conv1, tower.conv2):
        torch.nn.init.normal_(conv.weight, std=AUDIO_CONV_STD)
    torch.nn.init.normal_(tower.proj.weight, std=AUDIO_PROJECTOR_STD)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    processor = Qwen2_5OmniNoVideoProcessor(image_processor=image_processor, feature_extractor=extractor,
                                            tokenizer=tok, chat_template=CHAT_TEMPLATE)
    return model, processor

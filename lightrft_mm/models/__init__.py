"""Model loading: local Hugging Face folders and Hub ids (Auto classes; `models.hub` resolves a Hub id
to its cached snapshot) or `tiny:<family>` built offline."""

from __future__ import annotations

import json
from pathlib import Path

from lightrft_mm.errors import ModelError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_policy(model_cfg, *, seed: int = 0):
    """Return `(model, processor)` for `model.name_or_path` (see ModelConfig)."""
    import torch

    name = model_cfg.name_or_path
    if name.startswith("tiny:"):
        from lightrft_mm.models.tiny import build_tiny

        model, processor = build_tiny(name[len("tiny:"):], tokenizer=model_cfg.tiny_tokenizer, seed=seed)
    else:
        model, processor = load_pretrained(name, trust_remote_code=model_cfg.trust_remote_code,
                                           revision=model_cfg.revision or None)
    if model.config._attn_implementation != model_cfg.attn_implementation:
        model.set_attn_implementation(model_cfg.attn_implementation)
    return model.to(getattr(torch, DTYPES[model_cfg.dtype])), processor


def load_pretrained(path: str | Path, *, trust_remote_code: bool = False, revision: str | None = None):
    """Load a model folder (or a Hub id's snapshot, downloaded unless offline) with the Auto classes:
    image-text-to-text when the config has a vision tower, multimodal LM for an audio tower, causal
    LM otherwise; plus its processor.

    Args:
        path: A local model folder or a Hub id (`org/name`).
        trust_remote_code: Allow model code from the folder.
        revision: Branch, tag or commit of a Hub id.

    Returns:
        `(model, processor)`.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    from lightrft_mm.models.hub import resolve
    from lightrft_mm.models.processing import load_processor

    folder = resolve(str(path), revision)
    config_file = folder / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ModelError(f"model folder {folder} {what}. Expected a Hugging Face model folder "
                         "(config.json, *.safetensors, tokenizer files), a Hub id (ORG/NAME), or tiny:<family>.")
    config = json.loads(config_file.read_text())
    auto = (AutoModelForImageTextToText if "vision_config" in config
            else AutoModelForMultimodalLM if "audio_config" in config else AutoModelForCausalLM)
    try:
        model = auto.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model in {folder}: {e}") from e
    return model, load_processor(folder, trust_remote_code=trust_remote_code)

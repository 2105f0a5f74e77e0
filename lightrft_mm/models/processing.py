"""Processors that work without torchvision.

transformers' Qwen2-VL and Qwen3-VL processors insist on a video processor, and their video
processors need torchvision, which has no wheel for the CPU torch pinned here. For image and
text prompts the image-only variants below behave exactly like `Qwen2VLProcessor` /
`Qwen3VLProcessor` (same tokens, same `pixel_values` / `image_grid_thw` / `mm_token_type_ids`).
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def qwen_vl_image_processor_class():
    """Return `Qwen2VLImageOnlyProcessor`, a `Qwen2VLProcessor` without the video processor."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        """`Qwen2VLProcessor` for images and text; videos need the processors of lightrft_mm."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def to_dict(self):
            # Saved as the stock class, so AutoProcessor loads it wherever torchvision exists.
            return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}

    return Qwen2VLImageOnlyProcessor


@lru_cache(maxsize=None)
def qwen3_vl_image_processor_class():
    """`Qwen3VLImageOnlyProcessor`: `Qwen3VLProcessor` for images and text, without the video
    processor (which needs torchvision); saved as the stock class."""
    from transformers import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
        """`Qwen3VLProcessor` without a video processor; videos go through lightrft_mm's adapter."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            for name, token in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
                                ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>")):
                setattr(self, f"{name}_token", token)
                setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def to_dict(self):
            return {**super().to_dict(), "processor_class": "Qwen3VLProcessor"}

    return Qwen3VLImageOnlyProcessor


def load_processor(path: str | Path, *, trust_remote_code: bool = False):
    """Load the processor saved in `path`.

    Uses `AutoProcessor`; where that cannot build the processor only because a video processor
    needs torchvision (Qwen2-VL, Qwen2.5-VL, Qwen3-VL / Qwen3.5, InternVL, Qwen2.5-Omni), builds
    that processor's variant without it from the same files (`IMAGE_ONLY`, by the saved
    `processor_class`). A folder with a tokenizer and no image processor gives the tokenizer; an
    audio model's processor (a feature extractor, no image processor) is returned as
    AutoProcessor built it.
    """
    from transformers import AutoProcessor, AutoTokenizer

    from lightrft_mm.errors import ModelError

    kwargs = {"trust_remote_code": trust_remote_code}
    has_images = any((Path(path) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    error = None
    try:
        processor = AutoProcessor.from_pretrained(path, **kwargs)
        if hasattr(processor, "image_processor") or hasattr(processor, "feature_extractor") or not has_images:
            return processor
    except (ImportError, ValueError, TypeError, AttributeError, OSError) as e:
        error = e
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if not has_images:
        return tokenizer
    saved = _saved_processor_class(path)
    if saved in IMAGE_ONLY:
        module, name = IMAGE_ONLY[saved].split(":")
        found = getattr(importlib.import_module(module), name)
        cls = found if isinstance(found, type) else found()
        return cls.from_pretrained(path, **kwargs)  # its sub-processors and saved settings, without the video one
    raise ModelError(f"cannot build the processor saved in {path} ({saved or 'no processor_class'}): "
                     f"{error or 'AutoProcessor gave no image processor'}. Fix: check that its processor files match "
                     "the installed transformers version.")


# Stock processors whose video processor needs torchvision -> the class built here without it, or
# the function that returns it (same tokens, same image / audio tensors; saved as the stock class).
IMAGE_ONLY = {
    "Qwen2VLProcessor": "lightrft_mm.models.processing:qwen_vl_image_processor_class",
    "Qwen2_5_VLProcessor": "lightrft_mm.models.processing:qwen_vl_image_processor_class",
    "Qwen3VLProcessor": "lightrft_mm.models.processing:qwen3_vl_image_processor_class",
    "InternVLProcessor": "lightrft_mm.processors.internvl:internvl_image_processor_class",
    "Qwen2_5OmniProcessor": "lightrft_mm.processors.qwen_omni:Qwen2_5OmniNoVideoProcessor",
}


def _saved_processor_class(path: str | Path) -> str:
    """The `processor_class` a folder's processor files name ("" if none)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                found = json.loads(f.read_text()).get("processor_class")
            except (OSError, ValueError):
                continue
            if found:
                return found
    return ""


def _saved_chat_template(path: str | Path) -> str | None:
    f = Path(path) / "chat_template.jinja"
    return f.read_text() if f.is_file() else None

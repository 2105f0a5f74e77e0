"""Processors that work without torchvision.

transformers' Qwen2-VL processor insists on a video processor, and its video processors need
torchvision, which has no wheel for the CPU torch pinned here. For image and text prompts the
image-only variant below behaves exactly like `Qwen2VLProcessor` (same tokens, same
`pixel_values` / `image_grid_thw` / `mm_token_type_ids`).
"""

from __future__ import annotations

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

    return Qwen2VLImageOnlyProcessor


def load_processor(path: str | Path, *, trust_remote_code: bool = False):
    """Load the processor saved in `path`.

    Uses `AutoProcessor`; where that fails only because a video processor cannot be built
    without torchvision (Qwen2-VL family), builds the image-only variant from the same files.
    A folder with a tokenizer and no processor gives the tokenizer.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, TypeError, AttributeError, OSError) as first:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        try:
            image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            return tokenizer
        if type(image_processor).__name__.startswith("Qwen2VLImageProcessor"):
            cls = qwen_vl_image_processor_class()
            return cls(image_processor=image_processor, tokenizer=tokenizer,
                       chat_template=tokenizer.chat_template or _saved_chat_template(path))
        raise first


def _saved_chat_template(path: str | Path) -> str | None:
    for name in ("chat_template.jinja",):
        f = Path(path) / name
        if f.is_file():
            return f.read_text()
    return None

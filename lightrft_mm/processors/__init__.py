"""Modality processors (image, video, audio) and the model adapters built on them.

`make_adapter` picks the adapter registered for the model's `model_type`; models without one
(plain text LMs, or families whose HF processor does all the work) get `HFChatAdapter`.
"""

from __future__ import annotations

from lightrft_mm.registry import Registry

ADAPTERS = Registry("model adapter", entry_point_group="lightrft_mm.adapters")


def make_adapter(model, processor, *, system_prompt: str | None = None, image=None, video=None, audio=None):
    """The adapter for `model` (by `config.model_type`), configured by the media config sections.

    Args:
        model: the HF model (only its config is read).
        processor: its processor (or tokenizer).
        system_prompt: added to samples without a system message.
        image, video, audio: `ImageConfig`, `VideoConfig`, `AudioConfig` (defaults when None).
    """
    from lightrft_mm.config import AudioConfig, ImageConfig, VideoConfig
    from lightrft_mm.processors.adapter import HFChatAdapter

    model_type = getattr(model.config, "model_type", "")
    cls = ADAPTERS.get(model_type) if model_type in ADAPTERS else HFChatAdapter
    return cls(processor, system_prompt=system_prompt, image=image or ImageConfig(),
               video=video or VideoConfig(), audio=audio or AudioConfig())


ADAPTERS.register_lazy("llava", "lightrft_mm.processors.llava:LlavaAdapter")
ADAPTERS.register_lazy("llava_next", "lightrft_mm.processors.llava:LlavaNextAdapter")
ADAPTERS.register_lazy("qwen2_audio", "lightrft_mm.processors.qwen_audio:Qwen2AudioAdapter")
ADAPTERS.register_lazy("qwen2_vl", "lightrft_mm.processors.qwen_vl:QwenVLAdapter")
ADAPTERS.register_lazy("qwen2_5_vl", "lightrft_mm.processors.qwen_vl:Qwen2_5_VLAdapter")
ADAPTERS.register_lazy("qwen3_vl", "lightrft_mm.processors.qwen3_vl:Qwen3VLAdapter")
ADAPTERS.register_lazy("qwen3_5", "lightrft_mm.processors.qwen3_5:Qwen3_5Adapter")
ADAPTERS.register_lazy("qwen2_5_omni_thinker", "lightrft_mm.processors.qwen_omni:QwenOmniAdapter")
ADAPTERS.register_lazy("internvl", "lightrft_mm.processors.internvl:InternVLAdapter")
ADAPTERS.register_lazy("gemma3", "lightrft_mm.processors.gemma3:Gemma3Adapter")

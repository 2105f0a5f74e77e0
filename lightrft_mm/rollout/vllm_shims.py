"""Import shims for the processors of a vLLM engine. Standard library only; lazy: nothing is
imported until vLLM imports it.

Where torchvision cannot be installed (CPU machines with torch 2.13: DESIGN §10):
- `transformers.models.qwen2_vl.image_processing_qwen2_vl`, `...pixtral.image_processing_pixtral`
  and `...gemma3.image_processing_gemma3` import torchvision at module top; vLLM only takes helper
  functions (and Gemma 3 a class for its annotations) from them, which their PIL twins
  (`image_processing_pil_*`) define too: those are served under the old names. InternVL's video
  processor module (torchvision at its top) is served as a stub whose class builds no processor.
- transformers' processors that list a video processor fail to build without one (it needs
  torchvision): they are built without it.

Everywhere (torchvision or not), the Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni / Qwen3-VL processors
get `vllm_media.QwenVideoProcessor`, the trainer's own video math on the frames the trainer
sampled, so the engine's video patches are the trainer's; other processors that want a video
processor get `NoVideoProcessor` where torchvision is absent (no other family the trainer serves
with vLLM has videos there).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

ALIASES = {f"transformers.models.{family}.image_processing_{family}":
           f"transformers.models.{family}.image_processing_pil_{family}"
           for family in ("qwen2_vl", "pixtral", "gemma3", "got_ocr2")}
# Aliases whose `<Name>Pil` classes are also served as `<Name>` (vLLM's Gemma 3 and InternVL
# import `Gemma3ImageProcessor` / `GotOcr2ImageProcessor` for type annotations only); the others
# are the PIL module itself.
RENAMED = ("transformers.models.gemma3.image_processing_gemma3",
           "transformers.models.got_ocr2.image_processing_got_ocr2")
# Video processor modules that import torchvision at module top and whose class vLLM imports by
# name (InternVL's `InternS1ProcessingInfo` builds one for every processor): served as a module
# whose class builds a `NoVideoProcessor`.
VIDEO_STUBS = {"transformers.models.internvl.video_processing_internvl": "InternVLVideoProcessor"}
PATCHED = "transformers.processing_utils"
QWEN_VL_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen2_5OmniProcessor", "Qwen3VLProcessor")


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        target = importlib.import_module(self.target)
        if spec.name not in RENAMED:
            return target
        module = types.ModuleType(spec.name, target.__doc__)
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
        for name, value in vars(target).items():
            if isinstance(value, type) and name.endswith("Pil"):
                module.__dict__.setdefault(name[:-len("Pil")], value)
        return module

    def exec_module(self, module):
        pass


def patch_processors(module, *, drop_video: bool) -> None:
    """Patch `transformers.processing_utils` (see the module docstring). drop_video: leave the
    video processor out of every processor's parts (no torchvision to build one)."""
    mixin = module.ProcessorMixin
    if getattr(mixin, "_lightrft_patched", False):
        return
    attributes = mixin.get_attributes.__func__
    if drop_video:
        def get_attributes(cls):
            return [a for a in attributes(cls) if a != "video_processor"]

        mixin.get_attributes = classmethod(get_attributes)
    init = mixin.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if "video_processor" not in attributes(type(self)):
            return
        if any(c.__name__ in QWEN_VL_PROCESSORS for c in type(self).__mro__):
            from lightrft_mm.rollout.vllm_media import QwenVideoProcessor

            self.video_processor = QwenVideoProcessor(self.image_processor)
        elif getattr(self, "video_processor", None) is None:
            self.video_processor = NoVideoProcessor()

    mixin.__init__ = __init__
    mixin._lightrft_patched = True


class _PatchAfter(importlib.abc.Loader):
    """Runs the real loader, then `patch_processors`."""

    def __init__(self, loader, drop_video: bool):
        self.loader, self.drop_video = loader, drop_video

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        patch_processors(module, drop_video=self.drop_video)


class NoVideoProcessor(dict):
    """Stands where a torchvision video processor would in processors other than Qwen-VL's (an
    empty dict, so the processor still serialises): vLLM reads its accepted keywords (none);
    processing a video with it raises."""

    valid_kwargs = type("NoVideoKwargs", (), {"__annotations__": {}})  # no keyword accepted

    def __call__(self, *args, **kwargs):
        raise RuntimeError("this CPU vLLM engine has no video processor for this model family (torchvision is "
                           "absent; only the Qwen-VL / Omni processors get one of lightrft_mm's). "
                           "Fix: rollout.engine=hf for its video data.")


class _VideoStub(importlib.abc.Loader):
    def __init__(self, class_name: str):
        self.class_name = class_name

    def create_module(self, spec):
        module = types.ModuleType(spec.name, "lightrft_mm: no torchvision, so no video processor (vllm_shims).")

        class Stub:
            @classmethod
            def from_pretrained(cls, *args, **kwargs):
                return NoVideoProcessor()

        Stub.__name__ = Stub.__qualname__ = self.class_name
        setattr(module, self.class_name, Stub)
        return module

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, no_torchvision: bool):
        self.no_torchvision = no_torchvision

    def find_spec(self, name, path, target=None):
        if name in ALIASES and self.no_torchvision:
            return importlib.util.spec_from_loader(name, _Alias(ALIASES[name]))
        if name in VIDEO_STUBS and self.no_torchvision:
            return importlib.util.spec_from_loader(name, _VideoStub(VIDEO_STUBS[name]))
        if name == PATCHED:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    spec.loader = _PatchAfter(spec.loader, self.no_torchvision)
                    return spec
        return None


def install() -> bool:
    """Install the shims in this process (once). True when torchvision is absent: then every
    process of the engine needs them (vLLM starts several; `vllm_cpu/sitecustomize.py`)."""
    no_torchvision = importlib.util.find_spec("torchvision") is None
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        if PATCHED in sys.modules:  # imported already: patch it in place
            patch_processors(sys.modules[PATCHED], drop_video=no_torchvision)
        sys.meta_path.insert(0, _Finder(no_torchvision))
    return no_torchvision

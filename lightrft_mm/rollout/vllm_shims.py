"""Import shims that let vLLM's vision-language models load where torchvision cannot be
installed (CPU machines with torch 2.13: DESIGN §10). Standard library only; lazy: nothing is
imported until vLLM imports it.

- `transformers.models.qwen2_vl.image_processing_qwen2_vl` and `...pixtral.image_processing_pixtral`
  import torchvision at module top; vLLM only takes helper functions from them, which their PIL
  twins (`image_processing_pil_*`) define too: those are served under the old names.
- transformers' processors that list a video processor fail to build without one (it needs
  torchvision): they are built without it (the trainer never sends videos to such an engine).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

ALIASES = {f"transformers.models.{family}.image_processing_{family}":
           f"transformers.models.{family}.image_processing_pil_{family}" for family in ("qwen2_vl", "pixtral")}
PATCHED = "transformers.processing_utils"


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _PatchAfter(importlib.abc.Loader):
    """Runs the real loader, then leaves the video processor out of every processor's parts."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        attributes = module.ProcessorMixin.get_attributes.__func__

        def get_attributes(cls):
            return [a for a in attributes(cls) if a != "video_processor"]

        module.ProcessorMixin.get_attributes = classmethod(get_attributes)
        init = module.ProcessorMixin.__init__

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if "video_processor" in attributes(type(self)) and getattr(self, "video_processor", None) is None:
                self.video_processor = NoVideoProcessor()

        module.ProcessorMixin.__init__ = __init__


class NoVideoProcessor(dict):
    """Stands where a torchvision video processor would (an empty dict, so the processor still
    serialises): vLLM reads its accepted keywords (none);
    processing a video with it raises."""

    valid_kwargs = type("NoVideoKwargs", (), {"__annotations__": {}})  # no keyword accepted

    def __call__(self, *args, **kwargs):
        raise RuntimeError("this CPU vLLM engine has no video processor (torchvision is absent): videos "
                           "cannot be sampled here. Fix: rollout.engine=hf for video data.")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ALIASES:
            return importlib.util.spec_from_loader(name, _Alias(ALIASES[name]))
        if name == PATCHED:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    spec.loader = _PatchAfter(spec.loader)
                    return spec
        return None


def install() -> bool:
    """Install the shims when torchvision is absent; True when installed."""
    if importlib.util.find_spec("torchvision") is not None or any(isinstance(f, _Finder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _Finder())
    return True

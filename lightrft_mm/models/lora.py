"""LoRA adapters (`model.lora`), injected by peft in place.

`peft.inject_adapter_in_model` swaps each targeted `nn.Linear` for a peft LoRA layer holding the
original as `base_layer`; the model keeps its class, its parts and its blocks, so every strategy
wraps and shards it as before. Every base weight is frozen, only `lora_A` / `lora_B` train.

The rollout engine computes `base(x) + scale * B(A(x))` (dropout is off in eval mode), which is the
merged model's output; checkpoints hold both the merged weights (`merged_state_dict`, a plain
Hugging Face model transformers reloads) and the adapter alone (`adapter/`, which
`peft.PeftModel.from_pretrained(base, path/"adapter")` loads).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from lightrft_mm.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name inside the module tree
ADAPTER_DIR = "adapter"  # the adapter's folder inside a checkpoint


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA adapter tensor (`lora_A` / `lora_B`)."""
    return ".lora_A." in name or ".lora_B." in name


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ConfigError("model.lora.r > 0 needs peft. Fix: pip install 'lightrft_mm[lora]'.") from e
    return peft


def lora_targets(model: nn.Module, lora_cfg) -> list[str]:
    """Full names of the linear layers that get adapters: those of `lora_cfg.parts`, filtered by
    the last part of their name when `target_modules` is set; the output head only when named."""
    from lightrft_mm.models.trainable import part_of_each_module

    module_part = part_of_each_module(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = set(lora_cfg.target_modules)
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and module_part[name] in
              lora_cfg.parts and (m is not head or name.rpartition(".")[2] in wanted)]
    targets = [name for name in linear if not wanted or name.rpartition(".")[2] in wanted]
    missing = wanted - {name.rpartition(".")[2] for name in targets}
    if missing or not targets:
        known = sorted({name.rpartition(".")[2] for name in linear})
        raise ConfigError(f"model.lora.target_modules: {sorted(missing) or lora_cfg.target_modules} match no linear "
                          f"layer of parts {lora_cfg.parts}. Fix: any of {', '.join(known) or '(none there)'}, "
                          "or [] for all of them.")
    return targets


def apply_lora(model: nn.Module, lora_cfg) -> list[str]:
    """Inject adapters into `model` in place and freeze everything else; return the targets."""
    peft = _peft()
    targets = lora_targets(model, lora_cfg)
    config = peft.LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                             target_modules=targets, bias="none",
                             base_model_name_or_path=getattr(model, "name_or_path", None) or None)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    log.info("LoRA r=%d alpha=%g on %d linear layers of %s", lora_cfg.r, lora_cfg.alpha, len(targets),
             ", ".join(lora_cfg.parts))
    return targets


def lora_config(model: nn.Module):
    """The peft LoraConfig of a model with injected adapters, else None."""
    return (getattr(model, "peft_config", None) or {}).get(ADAPTER)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, every LoRA layer computes its frozen base layer only: the policy is its own base
    model (the KL reference without a copy of the weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True  # what peft's disable_adapter() sets, without touching requires_grad
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The plain model's state dict from the state dict of a model with LoRA layers: each base
    weight becomes `W + scaling * B @ A` (computed in fp32) under its original name; adapter
    tensors are dropped."""
    return dict(merged_stream(state.items(), scaling))


def merged_stream(items, scaling: float):
    """`merged_state_dict` over a stream of `(name, tensor)`: a LoRA layer's merged weight is
    yielded as soon as its base weight and both adapter matrices have passed (nothing else is
    held), other tensors at once."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in items:
        if is_adapter(key):
            which = "A" if ".lora_A." in key else "B"
            layer = key.split(f".lora_{which}.")[0]
            pending.setdefault(layer, {})[which] = value
        elif key.endswith(".base_layer.weight"):
            layer = key[:-len(".base_layer.weight")]
            pending.setdefault(layer, {})["W"] = value
        else:
            yield key.replace(".base_layer.", "."), value
            continue
        held = pending[layer]
        if len(held) == 3:
            del pending[layer]
            w = held["W"]
            yield f"{layer}.weight", (w.float() + scaling * (held["B"].float() @ held["A"].float())).to(w.dtype)


def save_adapter(state: dict[str, torch.Tensor], config, path: Path) -> None:
    """Write the adapter as peft saves one: adapter_model.safetensors + adapter_config.json."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    adapter = {"base_model.model." + key.replace(f".{ADAPTER}.", "."): value.contiguous()
               for key, value in state.items() if is_adapter(key)}
    save_file(adapter, str(path / "adapter_model.safetensors"))
    config.save_pretrained(str(path))

"""What of the policy trains: LoRA adapters (`model.lora`), frozen parts (`model.freeze`) and
activation checkpointing (`model.gradient_checkpointing`), applied once after loading, before any
optimizer exists.

The parts are found by structure (`lightrft_mm.models.parts`): `vision` is the vision / audio
tower without its projector, `projector` the media-to-text projector (with the base model's own
parameters, e.g. LLaVA-NeXT's image_newline), `llm` everything else (the language model, its
embeddings and output head). A frozen part keeps `requires_grad=False`, so no optimizer (of any
strategy) holds state for it.
"""

from __future__ import annotations

import logging

from lightrft_mm.models.parts import model_parts

log = logging.getLogger(__name__)

PARTS = ("vision", "projector", "llm")


def part_of_each_module(model) -> dict[str, str]:
    """{module name: its part} for every module of the model."""
    parts = model_parts(model)
    projector = {id(m) for top in parts.projectors for m in top.modules()}
    vision = {id(m) for top in parts.towers for m in top.modules()} - projector
    return {name: "projector" if id(m) in projector else "vision" if id(m) in vision else "llm"
            for name, m in model.named_modules()}


def part_of_each_parameter(model) -> dict[str, list]:
    """The model's parameters by part: {"vision": [...], "projector": [...], "llm": [...]}."""
    loose = {id(p) for p in model_parts(model).loose}  # the base model's own: with the projector
    module_part = part_of_each_module(model)
    groups: dict[str, list] = {name: [] for name in PARTS}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        groups["projector" if id(p) in loose else module_part[owner]].append(p)
    return groups


def apply_trainable(model, model_cfg) -> dict[str, int]:
    """Inject LoRA adapters if asked, freeze `model_cfg.freeze`, enable activation checkpointing
    if asked; log and return the counts {"params/<part>/trainable": n, "params/<part>/frozen": n}."""
    if model_cfg.lora.r:
        from lightrft_mm.models.lora import apply_lora

        apply_lora(model, model_cfg.lora)  # every base weight frozen, adapters trainable
    groups = part_of_each_parameter(model)
    for name in model_cfg.freeze:
        for p in groups[name]:
            p.requires_grad_(False)
    if model_cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs and with FSDP2 / ZeRO-3 hooks.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers before 5.2x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counts = {}
    for name, params in groups.items():
        counts[f"params/{name}/trainable"] = sum(p.numel() for p in params if p.requires_grad)
        counts[f"params/{name}/frozen"] = sum(p.numel() for p in params if not p.requires_grad)
    log.info("parameters trained: %s", trained_text(counts, model_cfg))
    return counts


def trained_text(counts: dict[str, int], model_cfg) -> str:
    """One line of what trains, e.g. `llm 16,384 of 139,840 (LoRA r=8), projector 0 of 24,800, ...`."""
    items = []
    for name in PARTS:
        trainable, frozen = counts[f"params/{name}/trainable"], counts[f"params/{name}/frozen"]
        lora = f" (LoRA r={model_cfg.lora.r})" if model_cfg.lora.r and name in model_cfg.lora.parts else ""
        items.append(f"{name} {trainable:,} of {trainable + frozen:,}{lora}")
    return ", ".join(items)

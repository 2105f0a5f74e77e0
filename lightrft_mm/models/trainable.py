"""What of the policy trains: frozen parts (`model.freeze`) and activation checkpointing
(`model.gradient_checkpointing`), applied once after loading, before any optimizer exists.

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


def part_of_each_parameter(model) -> dict[str, list]:
    """The model's parameters by part: {"vision": [...], "projector": [...], "llm": [...]}."""
    parts = model_parts(model)
    projector = {id(p) for m in parts.projectors for p in m.parameters()} | {id(p) for p in parts.loose}
    vision = {id(p) for m in parts.towers for p in m.parameters()} - projector
    groups: dict[str, list] = {name: [] for name in PARTS}
    for p in model.parameters():
        groups["projector" if id(p) in projector else "vision" if id(p) in vision else "llm"].append(p)
    return groups


def apply_trainable(model, model_cfg) -> dict[str, int]:
    """Freeze `model_cfg.freeze`, enable activation checkpointing if asked; log and return the
    counts {"params/<part>/trainable": n, "params/<part>/frozen": n}."""
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
    log.info("parameters trainable / frozen: %s", ", ".join(
        f"{name} {counts[f'params/{name}/trainable']:,} / {counts[f'params/{name}/frozen']:,}" for name in PARTS))
    return counts

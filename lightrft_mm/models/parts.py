"""The parts of a Hugging Face (V)LM that strategies shard, wrap or place as units.

Found by structure, not by family name: the repeated blocks are the modules of the model's
`_no_split_modules` classes that sit in a ModuleList (decoder layers, vision and audio encoder
blocks); the towers and projectors by the attribute names transformers uses for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

TOWERS = ("visual", "vision_tower", "audio_tower", "vision_model")


@dataclass
class ModelParts:
    """Attributes:
        blocks: decoder layers and vision / audio encoder blocks, in module order.
        projectors: the media-to-text projectors (LLaVA's projector, Qwen's patch merger).
        towers: the vision / audio encoders (holding their blocks and projector, if inside).
        embedding: the input embedding, as a unit of its own; None when absent or tied to the
            output head (Gemma 3, Qwen2.5-VL-3B). A tied pair stays in the root: the loss applies
            the head outside the model's forward, and a unit of its own would reduce-scatter the
            shared weight's gradient before the embedding's part of it arrived (measured under
            fsdp2: 7% of the gradient norm lost).
        loose: parameters the multimodal base model owns itself (LLaVA-NeXT's image_newline),
            which its feature methods use outside any forward.
    """

    blocks: list[nn.Module] = field(default_factory=list)
    projectors: list[nn.Module] = field(default_factory=list)
    towers: list[nn.Module] = field(default_factory=list)
    embedding: nn.Module | None = None
    loose: list[nn.Parameter] = field(default_factory=list)


def model_parts(model: nn.Module) -> ModelParts:
    parts = ModelParts()
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            parts.blocks += [m for m in module if type(m).__name__ in block_classes]
    base = getattr(model, "model", model)
    for name in TOWERS:
        tower = getattr(base, name, None)
        if isinstance(tower, nn.Module):
            parts.towers.append(tower)
            inner = getattr(tower, "merger", None)
            if isinstance(inner, nn.Module):
                parts.projectors.append(inner)
            # Qwen3-VL's DeepStack mergers project inner vision layers' features into the text model.
            parts.projectors += list(getattr(tower, "deepstack_merger_list", None) or ())
    if base is not model:
        parts.loose = list(base.parameters(recurse=False))
    projector = getattr(base, "multi_modal_projector", None)
    if isinstance(projector, nn.Module):
        parts.projectors.append(projector)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is getattr(embed, "weight", object())
    parts.embedding = None if tied else embed
    return parts

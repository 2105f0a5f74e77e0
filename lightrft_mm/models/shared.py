"""Work done once per prompt group: each prompt's media is encoded once, not once per completion.

GRPO samples n completions per prompt, so a rollout batch holds every prompt n times. Run as is,
the vision tower would encode each image 2n times per step (n in the generation prefill, n in the
loss forward). Here:

- **Rollout** (`prefill_once`): the prompts, media included, are prefilled once (all tokens but
  the last), the KV cache is copied to the n completions of each prompt, and `generate` goes on
  from there without media.
- **Training forward** (`group_encoder_outputs`): the vision features of each prompt are computed
  once, with gradients, and handed to the model (`mm_encoder_outputs`) for its n rows; the
  gradients of the n rows flow back through the one computation. Models without that input
  (Qwen2-Audio) get the prompt's input embeddings instead (`group_prompt_embeddings`): the
  model merges each prompt's media into its embeddings once, and the n rows continue from them.

Both give the same numbers as the per-row path (tests hold log-prob parity <= 1e-4 in fp32).
A batch's groups are found from its encodings: consecutive rows built from the same
`PromptEncoding` object share a prompt (`PromptBatch.repeat`, and the experience helpers that
re-collate rows, keep those objects).
"""

from __future__ import annotations

import inspect
import itertools

import torch

from lightrft_mm.processors.adapter import PromptBatch, collate

# Media inputs that an encoder consumes, by modality: (encoder input, layout inputs the encoder
# also needs; the layout inputs stay in the per-row model inputs too, e.g. for Qwen's M-RoPE).
ENCODER_INPUTS = {
    "image": ("pixel_values", ("image_grid_thw", "image_sizes")),
    "video": ("pixel_values_videos", ("video_grid_thw",)),
}


def prompt_groups(prompts: PromptBatch) -> list[int]:
    """Sizes of the runs of consecutive rows that share a prompt encoding ([] if unknown)."""
    encodings = prompts.encodings
    if not encodings or len(encodings) != prompts.input_ids.shape[0]:
        return []
    sizes = [1]
    for prev, cur in zip(encodings, encodings[1:]):
        if cur is prev:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def _base(model):
    return getattr(model, "model", None)


def supports_encoder_reuse(model) -> bool:
    """True when the model takes precomputed media features (`mm_encoder_outputs`)."""
    base = _base(model)
    forward = getattr(base, "forward", None)
    return forward is not None and "mm_encoder_outputs" in inspect.signature(forward).parameters


def _items(encoding, kind: str) -> int:
    """How many media items of `kind` one prompt holds (a layout row, or an encoder-input row, per item)."""
    key, layout = ENCODER_INPUTS[kind]
    for name in (*layout, key):  # layout first: Qwen's pixel rows are patches, its grid rows items
        if name in encoding.media:
            return int(encoding.media[name].shape[0])
    return 0


def group_encoder_outputs(model, prompts: PromptBatch) -> tuple[dict, dict] | None:
    """Encode each group's media once; returns (mm_encoder_outputs for every row, the per-row
    model inputs without the encoder inputs), or None when there is nothing to share."""
    sizes = prompt_groups(prompts)
    kinds = [k for k, (key, _) in ENCODER_INPUTS.items() if key in prompts.media]
    if not kinds or not sizes or max(sizes) == 1 or not supports_encoder_reuse(model):
        return None
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    base = _base(model)
    firsts = list(itertools.accumulate([0, *sizes[:-1]]))  # first row of each group
    unique = [prompts.encodings[i] for i in firsts]
    media = collate(unique, 0).media if len(unique) > 1 else dict(unique[0].media)
    outputs = {}
    for kind in kinds:
        key, layout = ENCODER_INPUTS[kind]
        encode = getattr(base, f"get_{kind}_features")
        accepted = inspect.signature(encode).parameters
        extra = {name: media[name].to(prompts.media[key].device) for name in layout
                 if name in media and name in accepted}
        encoded = encode(media[key].to(prompts.media[key].device), **extra, return_dict=True)
        counts = [_items(enc, kind) for enc in unique]
        rows = _rows_of_groups(encoded.pooler_output, counts, sizes)
        deepstack = getattr(encoded, "deepstack_features", None)
        if deepstack:  # Qwen3-VL: per vision layer, one feature tensor per item, repeated alike
            outputs[kind] = type(encoded)(pooler_output=rows, deepstack_features=[
                _rows_of_groups(layer, counts, sizes) for layer in deepstack])
        elif isinstance(encoded.pooler_output, torch.Tensor):  # InternVL: [tiles, tokens, H] in, one tensor back
            outputs[kind] = BaseModelOutputWithPooling(pooler_output=torch.stack(rows))
        else:
            outputs[kind] = BaseModelOutputWithPooling(pooler_output=rows)
    encoder_keys = {ENCODER_INPUTS[k][0] for k in kinds}
    rest = {k: v for k, v in prompts.media.items() if k not in encoder_keys}
    return outputs, rest


def _rows_of_groups(features, counts: list[int], sizes: list[int]) -> tuple:
    """Per-item features of the groups' prompts (`counts` items each, in order) -> the items of
    every row: each group's items repeated for its `sizes[group]` rows."""
    per_prompt, start = [], 0
    for count in counts:
        per_prompt.append(list(features[start:start + count]))
        start += count
    return tuple(f for group, size in enumerate(sizes) for _ in range(size) for f in per_prompt[group])


class _Captured(Exception):
    """Raised by a hook to stop a forward once the input embeddings are known."""


def group_prompt_embeddings(model, prompts: PromptBatch):
    """Each group's prompt embeddings, media merged in by the model itself, computed once and
    repeated for its rows: [N, Tp, H] (with gradients), or None when there is nothing to share.

    For models that take no precomputed media features but do take `inputs_embeds` and place
    tokens by the attention mask alone (not Qwen's M-RoPE, which needs the token ids).
    """
    sizes = prompt_groups(prompts)
    base = _base(model)
    language_model = getattr(base, "language_model", None)
    if (not prompts.media or not sizes or max(sizes) == 1 or language_model is None
            or hasattr(base, "rope_deltas")):
        return None
    firsts = list(itertools.accumulate([0, *sizes[:-1]]))  # first row of each group
    unique = collate([prompts.encodings[i] for i in firsts], 0).to(prompts.input_ids.device)
    if unique.input_ids.shape != (len(sizes), prompts.input_ids.shape[1]):
        return None  # the groups' prompts are not padded alike: nothing to reuse safely
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]
        raise _Captured

    # The model's own merge of text and media (its forward up to the language model).
    handle = language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        base(input_ids=unique.input_ids, attention_mask=unique.attention_mask, **unique.token_aligned,
             **unique.media)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "embeds" not in captured:
        return None
    index = torch.repeat_interleave(torch.arange(len(sizes), device=prompts.input_ids.device),
                                    torch.tensor(sizes, device=prompts.input_ids.device))
    return captured["embeds"][index]


def prefill_once(model, prompts: PromptBatch, n: int):
    """Prefill every prompt (media included) once, all tokens but the last, and copy the KV
    cache to its n completions (group-major). Returns the cache for `generate(cache=...)`.

    Models with Qwen's M-RoPE keep their rope offsets (`rope_deltas`) per row: those are
    copied too. Other models, and M-RoPE models on prompts without media, get position ids
    from the attention mask, as `generate` uses.
    """
    inputs = {"input_ids": prompts.input_ids[:, :-1], "attention_mask": prompts.attention_mask[:, :-1],
              **{k: v[:, :-1] for k, v in prompts.token_aligned.items()}, **prompts.media}
    base = _base(model)
    mrope = hasattr(base, "rope_deltas")
    if mrope:
        base.rope_deltas = None  # computed afresh for these prompts
    if not mrope or not any(k in inputs for k in ("image_grid_thw", "video_grid_thw")):
        # Text-only prompts give M-RoPE models no rope offsets: without these ids their prefill
        # would count the left padding, which generate's decode steps (positions from the
        # mask) do not.
        mask = inputs["attention_mask"].long()
        inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    repeat_cache(cache, n)
    if mrope and base.rope_deltas is not None:
        base.rope_deltas = base.rope_deltas.repeat_interleave(n, dim=0)
    return cache


def repeat_cache(cache, n: int) -> None:
    """Each row of `cache` n times in a row, in place: `batch_repeat_interleave`, plus the conv and
    recurrent states of linear-attention layers (Qwen3.5's Gated DeltaNet), which transformers'
    `LinearAttentionLayer` does not repeat (it has no `batch_repeat_interleave`; a hybrid layer
    inherits the key/value one only)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        cache.batch_repeat_interleave(n)
        return
    for layer in layers:
        if hasattr(layer, "batch_repeat_interleave"):
            layer.batch_repeat_interleave(n)
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            for idx, state in (states or {}).items():
                if state is not None:
                    states[idx] = state.repeat_interleave(n, dim=0)


def can_prefill_once(prompts: PromptBatch, n: int) -> bool:
    """Sharing the prefill pays for n > 1; it needs prompts of 2+ tokens whose last token is
    text (the chat template's generation prompt), as `generate` resumes from it without media."""
    if n < 2 or prompts.input_ids.shape[1] < 2:
        return False
    return all(not bool(v[:, -1].any()) for v in prompts.token_aligned.values())


__all__ = ["ENCODER_INPUTS", "can_prefill_once", "group_encoder_outputs", "group_prompt_embeddings",
           "prefill_once", "prompt_groups", "repeat_cache",
           "supports_encoder_reuse"]


"""Per-token log-probabilities of completions under the policy (the training forward).

The forward sees `prompt + completion` with the same attention mask and the same
token-aligned extras as generation (Qwen's `mm_token_type_ids`, zeros over the completion),
so the model derives the same position ids, M-RoPE index included, as it used while
generating. A test holds max |logp_gen - logp_train| <= 1e-4 in fp32.

With `share_media` (the default) the vision features of each prompt are computed once for
its group of completions (`lightrft_mm.models.shared`).

Memory: the model returns its final hidden states, not its [N, T, V] logits; `head_logprobs`
applies the output head to `CHUNK_ELEMENTS // vocabulary` positions at a time (442 for Qwen's
152k), upcasts that chunk to fp32, keeps its log-probs (and entropies) and drops it. Under
autograd each chunk is checkpointed and recomputed in the backward, so at most one chunk of
vocabulary logits is alive at any time. With `packed` (trainer.padding_free) the rows run as
one sequence of their real tokens (`pack_rows`) and the head sees only real completion tokens.
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import checkpoint

from lightrft_mm.algorithms.tokens import selective_logps, token_entropy
from lightrft_mm.models.shared import group_encoder_outputs, group_prompt_embeddings
from lightrft_mm.processors.adapter import PromptBatch


def sequence_inputs(prompts: PromptBatch, completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs for `prompt + completion`: prompts [N, Tp] (left-padded), completions [N, Tc]."""
    inputs = prompts.model_inputs()
    inputs["input_ids"] = torch.cat([prompts.input_ids, completion_ids], dim=1)
    inputs["attention_mask"] = torch.cat(
        [prompts.attention_mask, completion_mask.to(prompts.attention_mask.dtype)], dim=1)
    for key, value in prompts.token_aligned.items():
        inputs[key] = torch.cat([value, value.new_zeros(completion_ids.shape)], dim=1)
    return inputs


def forward_logprobs(model, prompts: PromptBatch, completion_ids: torch.Tensor,
                     completion_mask: torch.Tensor, *, temperature: float | torch.Tensor = 1.0,
                     with_entropy: bool = False, entropy_grad: bool = True,
                     share_media: bool = True, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the completion tokens, and optionally their entropies.

    Args:
        model: a causal LM / VLM (HF).
        prompts: the [N]-row prompt batch the completions were generated from.
        completion_ids: [N, Tc] right-padded completions.
        completion_mask: [N, Tc] 1 for real completion tokens.
        temperature: the sampling temperature (log-probs of the sampling distribution): a
            float, or a tensor of per-position temperatures, [Tc] or [N, Tc] (FIRE sampling,
            see `SamplingParams.temperatures`).
        with_entropy: also return per-token entropies [N, Tc].
        entropy_grad: the entropies carry gradients (an entropy bonus); False detaches them
            (they only select tokens).
        share_media: encode the media of rows that share a prompt once (same result, less work).
        packed: padding-free: the rows' real tokens run as one sequence (`pack_rows`).

    Returns:
        (logps [N, Tc], entropy [N, Tc] or None); padded positions hold arbitrary values.
    """
    tc = completion_ids.shape[1]
    inputs = sequence_inputs(prompts, completion_ids, completion_mask)
    shared = group_encoder_outputs(model, prompts) if share_media else None
    prompt_embeds = group_prompt_embeddings(model, prompts) if share_media and shared is None else None
    if shared is not None:
        encoder_outputs, media = shared
        inputs = {k: v for k, v in inputs.items() if k not in prompts.media} | media
        inputs["mm_encoder_outputs"] = encoder_outputs
    elif prompt_embeds is not None:
        completion_embeds = model.get_input_embeddings()(completion_ids)
        inputs = {k: v for k, v in inputs.items() if k not in prompts.media and k != "input_ids"}
        inputs["inputs_embeds"] = torch.cat([prompt_embeds, completion_embeds.to(prompt_embeds.dtype)], dim=1)
    # No position's logits from the model itself (an empty index): the head runs in chunks below.
    none = torch.zeros(0, dtype=torch.long, device=completion_ids.device)
    head = model.get_output_embeddings()
    if not packed:
        out = model(**inputs, use_cache=False, logits_to_keep=none, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -tc - 1:-1, :]  # the states that predict the completion tokens
        return head_logprobs(hidden, head, completion_ids, temperature,
                             with_entropy=with_entropy, entropy_grad=entropy_grad)

    keep = inputs["attention_mask"].bool()
    out = model(**pack_rows(model, inputs, keep, token_aligned=("input_ids", "inputs_embeds", *prompts.token_aligned)),
                use_cache=False, logits_to_keep=none, output_hidden_states=True)
    # Packed index of each padded position; the state at t - 1 predicts the token at t.
    index = keep.flatten().cumsum(0).view(keep.shape) - 1
    predictor = index[:, -tc - 1:-1]
    real = completion_mask.bool()
    temps = torch.as_tensor(temperature, dtype=torch.float32, device=real.device).expand(real.shape)[real]
    logps, entropy = head_logprobs(out.hidden_states[-1][0, predictor[real]][None], head,
                                   completion_ids[real][None], temps[None], with_entropy=with_entropy,
                                   entropy_grad=entropy_grad)
    unpack = lambda x: None if x is None else x.new_zeros(real.shape).masked_scatter(real, x[0])  # noqa: E731
    return unpack(logps), unpack(entropy)


def pack_rows(model, inputs: dict, keep: torch.Tensor, *, token_aligned: tuple[str, ...]) -> dict:
    """Padding-free model inputs: the kept positions ([N, T] bool) of every row, concatenated
    into one [1, L] sequence, with no attention mask and position ids that restart at 0 in each
    row. transformers reads the restarts as sequence boundaries: with sdpa / eager attention it
    builds a block-diagonal causal mask from them, with flash-attention it runs the varlen
    kernels on them; either way no token attends across rows. Models with Qwen's M-RoPE get the
    model's own 3D ids of each row (`get_rope_index`) after a row of text positions, [4, 1, L],
    the layout their forward takes for packed sequences."""
    mask = keep.long()
    text = mask.cumsum(-1) - 1  # 0 at each row's first real token
    base = getattr(model, "model", model)
    if hasattr(base, "get_rope_index"):
        grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        thinker = "audio_seqlens" in inspect.signature(base.get_rope_index).parameters  # Qwen2.5-Omni
        if thinker and ("image_grid_thw" in grids or "video_grid_thw" in grids):
            spatial, _ = _thinker_rope_index(base, inputs, mask)
        elif "image_grid_thw" in grids or "video_grid_thw" in grids:
            spatial, _ = base.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             attention_mask=mask, **grids)
        else:
            spatial = text.unsqueeze(0).expand(3, -1, -1)
        positions = torch.cat([text.unsqueeze(0), spatial.to(text)])[:, keep].unsqueeze(1)
    else:
        positions = text[keep].unsqueeze(0)
    packed = {k: v[keep].unsqueeze(0) if k in token_aligned else v
              for k, v in inputs.items() if k != "attention_mask"}
    if "token_type_ids" in packed:  # Gemma 3: image tokens attend both ways within their image
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        packed["attention_mask"] = packed_block_masks(model, packed.pop("token_type_ids"), rows)
    return packed | {"position_ids": positions}


def _thinker_rope_index(base, inputs: dict, mask: torch.Tensor):
    """Qwen2.5-Omni thinker's `get_rope_index` (its own signature: audio lengths, seconds per grid
    and the batch's `use_audio_in_video`), over the padded rows."""
    lengths = inputs.get("feature_attention_mask")
    return base.get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), mask,
                               bool(inputs.get("use_audio_in_video", False)),
                               None if lengths is None else lengths.sum(-1), inputs.get("video_second_per_grid"))


def packed_block_masks(model, token_type_ids: torch.Tensor, rows: torch.Tensor) -> dict:
    """The attention masks of each layer type for a packed sequence with bidirectional image
    blocks (Gemma 3's `token_type_ids`, [1, L]; `rows` [L]: the row each token came from).

    A token attends to the earlier tokens of its row and to every token of its own image; in
    sliding-window layers only to those less than the window away. Built here because transformers'
    sliding mask of packed sequences looks the image blocks up at each row's positions instead of
    at the packed indices (its `create_masks_for_vision_model`, 5.24), so images would attend
    to the wrong tokens. Raw packed indices serve for everything: a row's tokens are contiguous.
    """
    from transformers.masking_utils import (and_masks, blockwise_overlay, create_causal_mask,
                                            packed_sequence_mask_function, sliding_window_overlay)

    config = model.config.get_text_config()
    is_image = token_type_ids == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    blocks = torch.where(is_image, starts.cumsum(-1) - 1, -1)
    same_row = packed_sequence_mask_function(rows[None])
    shape = torch.empty((1, token_type_ids.shape[1], 0), dtype=model.get_input_embeddings().weight.dtype,
                        device=token_type_ids.device)
    masks = {}
    for kind in set(getattr(config, "layer_types", None) or ["full_attention"]):
        window = config.sliding_window if kind == "sliding_attention" else None
        masks[kind] = create_causal_mask(
            config=config, inputs_embeds=shape, attention_mask=None, cache=None, position_ids=None,
            or_mask_function=blockwise_overlay(blocks),
            and_mask_function=and_masks(same_row, sliding_window_overlay(window)) if window else same_row)
    return masks


CHUNK_ELEMENTS = 1 << 26  # vocabulary logits per chunk: 256 MB in fp32, whatever the vocabulary


def head_logprobs(hidden: torch.Tensor, head, tokens: torch.Tensor, temperature: float | torch.Tensor = 1.0, *,
                  with_entropy: bool = False, entropy_grad: bool = False,
                  chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of `tokens` (and entropies) under `softmax(head(hidden) / temperature)`, in chunks.

    Args:
        hidden: [N, T, H] final hidden states, position t predicting tokens[:, t].
        head: the output embedding (lm_head) module.
        tokens: [N, T] token ids.
        temperature: a float, or per-position temperatures [T] or [N, T].
        with_entropy: also return entropies.
        entropy_grad: the entropies carry gradients (an entropy bonus); without it they are
            detached (token selection only).
        chunk_tokens: positions whose logits exist at once (default `CHUNK_ELEMENTS // vocabulary`).

    Returns:
        (logps [N, T], entropy [N, T] or None), float32.
    """
    n, t, width = hidden.shape
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # (ZeRO-3 empties .weight)
    chunk_tokens = chunk_tokens or max(1, CHUNK_ELEMENTS // vocab)
    temps = torch.as_tensor(temperature, dtype=torch.float32, device=hidden.device).expand(n, t).reshape(-1)
    flat, ids = hidden.reshape(n * t, width), tokens.reshape(-1)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    logps, entropies = [], []
    for start in range(0, n * t, chunk_tokens):
        part = (flat[start:start + chunk_tokens], ids[start:start + chunk_tokens], temps[start:start + chunk_tokens])
        lp, ent = (checkpoint(_chunk_stats, head, *part, with_entropy, use_reentrant=False) if grad
                   else _chunk_stats(head, *part, with_entropy))
        logps.append(lp)
        entropies.append(ent if entropy_grad or ent is None else ent.detach())
    logps = torch.cat(logps).view(n, t) if logps else hidden.new_zeros((n, t), dtype=torch.float32)
    if not with_entropy:
        return logps, None
    return logps, torch.cat(entropies).view(n, t) if entropies else torch.zeros_like(logps)


def _chunk_stats(head, hidden: torch.Tensor, ids: torch.Tensor, temps: torch.Tensor, with_entropy: bool):
    """One chunk: [K, H] states -> [K] log-probs of `ids` and [K] entropies (or None), via fp32 logits."""
    logits = (head(hidden).float() / temps.unsqueeze(-1)).unsqueeze(0)  # [1, K, V]
    logps = selective_logps(logits, ids.unsqueeze(0))[0]
    return logps, token_entropy(logits)[0] if with_entropy else None

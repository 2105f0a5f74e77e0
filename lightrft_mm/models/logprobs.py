"""Per-token log-probabilities of completions under the policy (the training forward).

The forward sees `prompt + completion` with the same attention mask and the same
token-aligned extras as generation (Qwen's `mm_token_type_ids`, zeros over the completion),
so the model derives the same position ids, M-RoPE index included, as it used while
generating. A test holds max |logp_gen - logp_train| <= 1e-4 in fp32.

With `share_media` (the default) the vision features of each prompt are computed once for
its group of completions (`lightrft_mm.models.shared`).
"""

from __future__ import annotations

import torch

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
                     with_entropy: bool = False, share_media: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        share_media: encode the media of rows that share a prompt once (same result, less work).

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
    out = model(**inputs, use_cache=False, logits_to_keep=tc + 1)
    logits = out.logits[:, -tc - 1:-1, :].float()
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.to(logits.device, logits.dtype).expand(logits.shape[:2]).unsqueeze(-1)
    elif temperature != 1.0:
        logits = logits / temperature
    logps = selective_logps(logits, completion_ids)
    entropy = token_entropy(logits) if with_entropy else None
    return logps, entropy

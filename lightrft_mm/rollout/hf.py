"""Rollout with Hugging Face `generate`: batched, n completions per prompt, CPU friendly.

FIRE sampling (Chen et al. 2024, "Flaming-hot Initiation with Regular Execution", arXiv
2410.21236) draws the first completion token at a high temperature and the rest at the normal
one: diverse openings, coherent continuations. The returned log-probs are those of the
distribution each token was drawn from (`SamplingParams.temperatures`), which is also what the
trainer recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from lightrft_mm.algorithms.tokens import selective_logps
from lightrft_mm.models.shared import can_prefill_once, prefill_once
from lightrft_mm.processors.adapter import HFChatAdapter, PromptBatch


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled (filled from the `rollout` config section)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    first_temperature: float = 0.0

    def temperatures(self, length: int) -> float | torch.Tensor:
        """The temperature of each completion position: a float, or [length] with FIRE on.

        Greedy decoding has no temperature (1.0); with ``first_temperature > 0`` position 0
        is drawn at it and the others at ``temperature``.
        """
        if self.greedy:
            return 1.0
        if self.first_temperature <= 0:
            return self.temperature
        temps = torch.full((length,), float(self.temperature))
        temps[:1] = self.first_temperature
        return temps


class _SampledLogps(LogitsProcessor):
    """Records log softmax(raw logits / T_t) of each sampled token while `generate` runs, holding
    one decoding step's logits at a time (never the [N, T, V] stack of `output_logits`).

    A forward hook on the output head keeps the newest step's raw logits. This processor, called
    once per real decoding step (not for the idle steps of `synced_gpus`), changes nothing: it
    scores the token sampled from the previous step's logits (now the last of `input_ids`) and
    moves the newest step's logits into its place; `finish` scores the last token.
    `close` removes the hook.
    """

    def __init__(self, head, temps: torch.Tensor):
        self.temps, self.newest, self.previous, self.logps = temps, None, None, []
        self._handle = head.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.newest = output[:, -1:].detach()

    def _score(self, tokens: torch.Tensor) -> None:
        t = len(self.logps)
        self.logps.append(selective_logps(self.previous, tokens[:, None], float(self.temps[t]))[:, 0])

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self._score(input_ids[:, -1])
        self.previous = self.newest
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[N, T] log-probs of the generated tokens (the last `T` columns of `sequences`)."""
        if self.previous is not None:
            self._score(sequences[:, -1])
        self.previous = None
        return torch.stack(self.logps, dim=1)

    def close(self) -> None:
        self._handle.remove()


class _FirstTokenTemperature(LogitsProcessor):
    """Logits processor for FIRE: temperature `first` at the first new token, `rest` after,
    then top-k / top-p on the tempered scores (what `generate` does for one temperature)."""

    def __init__(self, prompt_len: int, first: float, rest: float, top_k: int, top_p: float):
        self.prompt_len, self.first, self.rest = prompt_len, first, rest
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + (
            [TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / (self.first if input_ids.shape[1] == self.prompt_len else self.rest)
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        return scores


@dataclass
class Rollouts:
    """Completions of a [B]-prompt batch, n each, group-major ([B * n] rows).

    Attributes:
        prompts: the prompt batch repeated n times ([B * n] rows).
        completion_ids: [B * n, Tc] right-padded with the pad id.
        completion_mask: [B * n, Tc] 1 up to and including the end-of-turn token.
        logps: [B * n, Tc] log-probs of the sampled tokens under the sampling distribution.
        texts: decoded completions, special tokens removed.
        n: completions per prompt.
    """

    prompts: PromptBatch
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    texts: list[str]
    n: int


def completion_mask_from(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[N, Tc] mask: 1 for every token up to and including the first EOS."""
    is_eos = ids == eos_id
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


class HFRolloutEngine:
    """`RolloutEngine` over `model.generate` (DESIGN.md §4).

    Args:
        model: the policy (shared with the trainer: no weight sync needed).
        adapter: the model adapter that encoded the prompts.
        share_prefill: prefill each prompt once and copy its KV cache to its n completions
            (`lightrft_mm.models.shared.prefill_once`); False runs the prefill on every copy.
        comm: the strategy (its collectives), when several ranks generate at once: with
            sharded weights every forward is collective, so the ranks agree on the prefill path
            and keep stepping (`synced_gpus`) until every rank's completions have ended.
    """

    def __init__(self, model, adapter: HFChatAdapter, *, share_prefill: bool = True, comm=None):
        self.model = model
        self.adapter = adapter
        self.share_prefill = share_prefill
        self.comm = comm if comm is not None and comm.world_size > 1 else None
        self._suppress = adapter.special_ids_to_suppress()

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, n: int, sampling: SamplingParams) -> Rollouts:
        """Sample n completions for each prompt; returns tokens, text and per-token log-probs."""
        batch = prompts.repeat(n, self.adapter.pad_token_id).to(self.model.device)
        was_training = self.model.training
        self.model.eval()
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                      eos_token_id=self.adapter.eos_token_id, pad_token_id=self.adapter.pad_token_id,
                      suppress_tokens=self._suppress or None, return_dict_in_generate=True)
        # Raw logits (before processors) at each position's sampling temperature: the
        # distribution the training forward recomputes.
        temps = torch.as_tensor(sampling.temperatures(sampling.max_new_tokens), dtype=torch.float32)
        record = _SampledLogps(self.model.get_output_embeddings(), temps.expand(sampling.max_new_tokens))
        processors = [record]
        if not sampling.greedy and sampling.first_temperature > 0:
            processors.append(_FirstTokenTemperature(batch.input_ids.shape[1], sampling.first_temperature,
                                                     sampling.temperature, sampling.top_k, sampling.top_p))
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        elif not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        share = self.share_prefill and can_prefill_once(prompts, n)
        if self.comm is not None:
            share = self.comm.all_reduce(float(share), "min") > 0
            kwargs["synced_gpus"] = True
        if share:
            # Each prompt (media included) prefilled once, its KV cache copied to its n rows.
            kwargs["cache"] = prefill_once(self.model, prompts.to(self.model.device), n)
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.token_aligned}
        else:
            inputs = batch.model_inputs()
        try:
            out = self.model.generate(**inputs, **kwargs, logits_processor=LogitsProcessorList(processors))
        finally:
            record.close()
        logps = record.finish(out.sequences)
        if was_training:
            self.model.train()
        ids = out.sequences[:, batch.input_ids.shape[1]:]
        mask = completion_mask_from(ids, self.adapter.eos_token_id)
        logps = logps * mask
        ids = ids.masked_fill(mask == 0, self.adapter.pad_token_id)
        return Rollouts(batch, ids, mask, logps, self.adapter.decode(ids), n)

    def load_weights(self, state) -> None:
        """The HF engine generates with the training model itself: nothing to copy."""

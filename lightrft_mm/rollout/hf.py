"""Rollout with Hugging Face `generate`: batched, n completions per prompt, CPU friendly.

FIRE sampling (Chen et al. 2024, "Flaming-hot Initiation with Regular Execution", arXiv
2410.21236) draws the first completion token at a high temperature and the rest at the normal
one: diverse openings, coherent continuations. The returned log-probs are those of the
distribution each token was drawn from (`SamplingParams.temperatures`), which is also what the
trainer recomputes.
"""

from __future__ import annotations

import contextlib
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
    first_top_k: int = 0
    repetition_penalty: float = 1.0

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
    """Records, for each sampled token, its log-prob under the policy at the sampling temperature
    (log softmax(raw logits / T_t), what the trainer recomputes) and under the distribution it
    was actually drawn from (log softmax of the processed scores: suppression, repetition
    penalty, temperature, top-k, top-p), holding one decoding step at a time (never the
    [N, T, V] stack of `output_logits`).

    The last processor of the list, so its `scores` are the final ones; a forward hook on the
    output head keeps the newest step's raw logits. Called once per real decoding step (not for
    the idle steps of `synced_gpus`), it changes nothing: it scores the token sampled at the
    previous step (now the last of `input_ids`) and keeps this step's logits and scores in its
    place; `finish` scores the last token. `close` removes the hook.
    """

    def __init__(self, head, temps: torch.Tensor):
        self.temps, self.newest, self.previous = temps, None, None
        self.logps, self.sample_logps = [], []
        self._handle = head.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.newest = output[:, -1:].detach()

    def _score(self, tokens: torch.Tensor) -> None:
        raw, processed = self.previous
        t = len(self.logps)
        self.logps.append(selective_logps(raw, tokens[:, None], float(self.temps[t]))[:, 0])
        self.sample_logps.append(selective_logps(processed.unsqueeze(1), tokens[:, None])[:, 0])

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self._score(input_ids[:, -1])
        self.previous = self.newest, scores
        return scores

    def finish(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T] policy and sampling log-probs of the generated tokens (the last `T` columns
        of `sequences`)."""
        if self.previous is not None:
            self._score(sequences[:, -1])
        self.previous = None
        return torch.stack(self.logps, dim=1), torch.stack(self.sample_logps, dim=1)

    def close(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def _neutral_generation_config(model):
    """While generating, the model's generation_config is transformers' defaults: a checkpoint's
    own sampling settings (Qwen-VL Instruct ships repetition_penalty 1.05, top_k, top_p, ...)
    would otherwise fill every value `generate` is not given and change the distribution."""
    from transformers import GenerationConfig

    hf_model = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
    own = hf_model.generation_config
    hf_model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf_model.generation_config = own


class _Warp(LogitsProcessor):
    """The sampling warpers, in `generate`'s order: temperature, then top-k and top-p on the
    tempered scores. At the first new token (FIRE) the temperature is `first` and the top-k
    `first_top_k` (0 = `top_k`); after it `rest` and `top_k`."""

    def __init__(self, prompt_len: int, first: float, rest: float, top_k: int, top_p: float,
                 first_top_k: int = 0):
        self.prompt_len, self.first, self.rest = prompt_len, first, rest
        top_p_warp = [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + top_p_warp
        k = first_top_k or top_k
        self.first_warpers = ([TopKLogitsWarper(k)] if k > 0 else []) + top_p_warp

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        first = input_ids.shape[1] == self.prompt_len
        scores = scores / (self.first if first else self.rest)
        for warp in self.first_warpers if first else self.warpers:
            scores = warp(input_ids, scores)
        return scores


@dataclass
class Rollouts:
    """Completions of a [B]-prompt batch, n each, group-major ([B * n] rows).

    Attributes:
        prompts: the prompt batch repeated n times ([B * n] rows).
        completion_ids: [B * n, Tc] right-padded with the pad id.
        completion_mask: [B * n, Tc] 1 up to and including the end-of-turn token.
        logps: [B * n, Tc] log-probs of the sampled tokens under the policy at the sampling
            temperature (per position with FIRE): what the trainer's forward recomputes.
        texts: decoded completions, special tokens removed.
        n: completions per prompt.
        sample_logps: [B * n, Tc] log-probs under the distribution the tokens were actually
            drawn from (after suppression, repetition penalty, temperature, top-k, top-p): the
            behaviour policy of the truncated importance weight. None = equal to `logps`.
    """

    prompts: PromptBatch
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    texts: list[str]
    n: int
    sample_logps: torch.Tensor | None = None

    @property
    def behaviour_logps(self) -> torch.Tensor:
        """The log-probs the tokens were drawn with (`sample_logps`, else `logps`)."""
        return self.logps if self.sample_logps is None else self.sample_logps


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
        # Sampling is fully ours: generate's own warpers are neutral and the checkpoint's
        # generation_config is set aside (`_neutral_generation_config`), so the distribution
        # sampled from is exactly the one `_SampledLogps` records.
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                      eos_token_id=self.adapter.eos_token_id, pad_token_id=self.adapter.pad_token_id,
                      suppress_tokens=self._suppress or None, repetition_penalty=sampling.repetition_penalty,
                      return_dict_in_generate=True)
        temps = torch.as_tensor(sampling.temperatures(sampling.max_new_tokens), dtype=torch.float32)
        record = _SampledLogps(self.model.get_output_embeddings(), temps.expand(sampling.max_new_tokens))
        processors = [record]
        if not sampling.greedy:
            kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
            first = sampling.first_temperature if sampling.first_temperature > 0 else sampling.temperature
            processors.insert(0, _Warp(batch.input_ids.shape[1], first, sampling.temperature, sampling.top_k,
                                       sampling.top_p, sampling.first_top_k))
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
            with _neutral_generation_config(self.model):
                out = self.model.generate(**inputs, **kwargs, logits_processor=LogitsProcessorList(processors))
        finally:
            record.close()
        logps, sample_logps = record.finish(out.sequences)
        if was_training:
            self.model.train()
        ids = out.sequences[:, batch.input_ids.shape[1]:]
        mask = completion_mask_from(ids, self.adapter.eos_token_id)
        ids = ids.masked_fill(mask == 0, self.adapter.pad_token_id)
        # Padding after an early end of turn is a suppressed token, -inf under the sampled
        # distribution: zeroed by masked_fill (a product with the mask would give NaN).
        return Rollouts(batch, ids, mask, logps * mask, self.adapter.decode(ids), n,
                        sample_logps.masked_fill(mask == 0, 0.0))

    records_policy_logps = True  # `logps` is the policy at the sampling temperature

    def sync(self, strategy) -> None:
        """The HF engine generates with the training model itself: nothing to copy."""

    def sleep(self) -> None:
        """Nothing to free: the model is the trainer's."""

    def close(self) -> None:
        """Nothing to stop."""

    def metrics(self) -> dict:
        return {}

"""Worker of tests/test_distributed.py: GRPO updates on one fixed global batch of completions.

    python tests/workers/parity.py CASES.json
    torchrun --nproc_per_node 2 tests/workers/parity.py CASES.json

CASES.json lists the runs, one after another in this process (importing torch, transformers and
DeepSpeed on each rank takes longer than a case): [{"out": OUT.json, "data": DATA_DIR,
"overrides": ["strategy.name=fsdp2", ...]}, ...]. A case that fails ends the process, with the
traceback on stderr; torchrun then stops the other rank.

The global batch (4 prompts x 4 completions, completion tokens and rewards drawn from a fixed
seed) is the same whatever the world size; rank r takes prompt groups r, r + world, ... as the
loader does. Each step is the loop's own `optimise` (mini-batches, micro-batches of one group),
so the losses and gradient norms of a 2-rank run must equal those of one process. Rank 0
writes {"loss": [...], "grad_norm": [...], "changed": {param: bool}, "changed_fraction": x,
"engine_weights_equal": bool} (the weights streamed to a rollout engine equal the full state dict).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

from lightrft_mm.algorithms.advantages import compute_advantages
from lightrft_mm.config import load_config
from lightrft_mm.datasets.loader import load_samples
from lightrft_mm.models import load_policy, logprobs
from lightrft_mm.models.trainable import apply_trainable
from lightrft_mm.processors import make_adapter
from lightrft_mm.rollout.hf import Rollouts, completion_mask_from
from lightrft_mm.strategy import STRATEGIES
from lightrft_mm.trainer.experience import group_rows, select_rows
from lightrft_mm.trainer.loop import optimise
from lightrft_mm.trainer.metrics import reduce_metrics

PROMPTS, N, WIDTH, STEPS = 4, 4, 6, 3


def fixed_batch(adapter, samples, vocab: int) -> tuple[Rollouts, torch.Tensor]:
    """The global batch: completions of random ordinary tokens ending in end-of-turn, and rewards."""
    g = torch.Generator().manual_seed(0)
    prompts = adapter.encode_prompts(samples[:PROMPTS]).repeat(N, adapter.pad_token_id)
    ids = torch.randint(3, min(vocab, 200), (PROMPTS * N, WIDTH), generator=g)
    ends = torch.randint(2, WIDTH, (PROMPTS * N,), generator=g)
    ids[torch.arange(PROMPTS * N), ends] = adapter.eos_token_id
    mask = completion_mask_from(ids, adapter.eos_token_id)
    ids = ids.masked_fill(mask == 0, adapter.pad_token_id)
    rewards = torch.randint(0, 2, (PROMPTS, N), generator=g).float()
    return Rollouts(prompts, ids, mask, torch.zeros(ids.shape), [""] * len(ids), N), rewards


def run_case(out: str, data: str, overrides: list[str], *, last: bool) -> None:
    cfg = load_config(None, ["model.name_or_path=tiny:qwen2_5_vl", "trainer.lr=1e-3", "data.batch_size=4",
                             *overrides])
    strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, max_grad_norm=cfg.trainer.max_grad_norm)
    torch.manual_seed(0)
    model, processor = load_policy(cfg.model, seed=0)
    apply_trainable(model, cfg.model)  # model.lora / freeze / gradient_checkpointing
    adapter = make_adapter(model, processor)
    rollouts, rewards = fixed_batch(adapter, load_samples([data]), model.config.get_text_config().vocab_size)
    groups = list(range(strategy.rank, PROMPTS, strategy.world_size))
    mine = select_rows(rollouts, group_rows(groups, N), adapter.pad_token_id)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = cfg.trainer
    model, _ = strategy.prepare(model.to(strategy.device), functools.partial(
        torch.optim.AdamW, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay))
    alg = cfg.algorithm
    forward = functools.partial(logprobs.forward_logprobs, share_media=True, packed=cfg.trainer.padding_free)
    mask = mine.completion_mask
    advantages = compute_advantages(alg.advantage, rewards[groups], mask, scale_by_std=alg.scale_by_std,
                                    sum_across=strategy.all_reduce)
    with torch.no_grad():
        old_logps, _ = forward(model, mine.prompts, mine.completion_ids, mask)
    mine.logps = old_logps
    history = {"loss": [], "grad_norm": []}
    for _ in range(STEPS):
        stats = optimise(model, strategy, mine, old_logps, advantages, mask, alg=alg, temps=1.0, ref_logps=None,
                         kl_coef=0.0, max_tokens=WIDTH, micro_batch_groups=1, forward_logprobs=forward,
                         pad_id=adapter.pad_token_id)
        history["loss"].append(reduce_metrics(strategy, {"loss": stats["loss"]})["loss"])
        history["grad_norm"].append(stats["grad_norm"])
    after = strategy.full_state_dict()
    streamed = list(strategy.engine_weights())  # what a vLLM engine is sent, one tensor at a time
    if strategy.is_main:
        stream_equal = [k for k, _ in streamed] == list(after) and all(
            torch.equal(v.to(after[k].dtype), after[k]) for k, v in streamed)
    else:
        stream_equal = all(v is None for _, v in streamed)
    stream_equal = strategy.all_reduce(float(stream_equal), "min") > 0
    if strategy.is_main:
        changed = {k: not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before
                   if before[k].is_floating_point()}
        elements = sum(int((before[k] != after[k].to(before[k].dtype)).sum()) for k in changed)
        total = sum(before[k].numel() for k in changed)
        Path(out).write_text(json.dumps({**history, "changed": changed, "changed_fraction": elements / total,
                                         "engine_weights_equal": stream_equal}))
    if last:
        strategy.close()
    else:
        strategy.barrier()  # the next case builds its strategy in the same process group


def main(spec: str) -> None:
    cases = json.loads(Path(spec).read_text())
    for i, case in enumerate(cases):
        run_case(case["out"], case["data"], case["overrides"], last=i == len(cases) - 1)


if __name__ == "__main__":
    main(sys.argv[1])

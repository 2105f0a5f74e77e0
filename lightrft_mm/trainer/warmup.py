"""Format warm-up: a short supervised phase that teaches the answer format, not the answers.

Each target is `template` filled with a *random* one of the sample's `choices` (never its
`answer`), followed by end-of-turn. The model learns to emit a well-formed answer, and its
accuracy stays at chance: whatever it knows about the task afterwards, RL taught it.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from lightrft_mm.errors import DataError
from lightrft_mm.models.logprobs import forward_logprobs


def format_targets(samples, template: str, rng: random.Random) -> list[str]:
    """One random-choice target text per sample."""
    targets = []
    for s in samples:
        if not s.choices:
            raise DataError(f"sample {s.id}: warm-up needs `choices` to draw a random, answer-free "
                            "target. Fix: set warmup.steps=0, or give the samples choices.")
        targets.append(template.replace("{answer}", str(rng.choice(list(s.choices)))))
    return targets


def warmup(model, adapter, batch_iter, cfg, *, seed: int, device, progress: bool = True,
           packed: bool = False, logger=None) -> list[float]:
    """Run `cfg.steps` supervised steps on random-choice targets (padding-free with `packed`);
    returns the losses. `logger` (a `RunLogger`) gets one row per step: `{"step": 0,
    "warmup/step": i, "warmup/loss": x}` (i from 1; the backends plot warmup/* on warmup/step)."""
    rng = random.Random(seed)
    tok = adapter.tokenizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="warm-up", disable=not progress, dynamic_ncols=True)
    for i in bar:
        samples = next(batch_iter)
        prompts = adapter.encode_prompts(samples).to(device)
        texts = format_targets(samples, cfg.template, rng)
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [adapter.eos_token_id] for t in texts]
        width = max(len(x) for x in ids)
        targets = torch.full((len(ids), width), adapter.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            targets[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        logps, _ = forward_logprobs(model, prompts, targets.to(device), mask.to(device), packed=packed)
        loss = -(logps * mask.to(device)).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if logger is not None:
            logger.write({"step": 0, "warmup/step": i + 1, "warmup/loss": losses[-1]})
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses

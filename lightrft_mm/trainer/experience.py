"""Rollout batches as training experience: pick prompt groups, join batches, split mini-batches,
and (data parallel) give every rank as many groups as the others.

A `Rollouts` is group-major (rows g*n .. g*n+n-1 are prompt g's completions) and its prompts
keep their per-prompt encodings, so any subset of groups can be re-collated exactly.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from lightrft_mm.algorithms.stabilisers import informative_groups
from lightrft_mm.processors.adapter import collate
from lightrft_mm.rewards.core import Outcome
from lightrft_mm.rollout.hf import Rollouts
from lightrft_mm.strategy.dist import LOCAL
from lightrft_mm.trainer.metrics import merge_metrics

log = logging.getLogger(__name__)


def group_rows(groups: list[int], n: int) -> list[int]:
    """Row indices of the completions of prompt groups `groups` (n completions each)."""
    return [g * n + j for g in groups for j in range(n)]


def select_rows(rollouts: Rollouts, rows: list[int], pad_id: int) -> Rollouts:
    """The rollouts restricted to `rows` (prompts re-collated, tensors indexed).

    Args:
        rollouts: a batch of completions.
        rows: row indices to keep, in order (whole groups, to stay group-major).
        pad_id: the tokenizer's pad id.

    Returns:
        A new `Rollouts` on the device of `rollouts`, its completions cut to the longest
        selected one (so per-token tensors of the full batch need `[:, :width]` to match).
    """
    if not rows:
        raise ValueError("select_rows: no rows selected")
    device = rollouts.completion_ids.device
    prompts = collate([rollouts.prompts.encodings[i] for i in rows], pad_id).to(device)
    index = torch.tensor(rows, device=device)
    mask = rollouts.completion_mask[index]
    width = max(int(mask.sum(dim=1).max()), 1)  # drop completion columns no selected row uses
    return Rollouts(prompts, rollouts.completion_ids[index, :width], mask[:, :width],
                    rollouts.logps[index, :width], [rollouts.texts[i] for i in rows], rollouts.n,
                    rollouts.behaviour_logps[index, :width])


def _pad_right(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Join rollout batches row-wise, right-padding the completions to the longest.

    Args:
        parts: batches with the same n, on one device.
        pad_id: the tokenizer's pad id.

    Returns:
        One `Rollouts` whose rows are those of `parts` in order.
    """
    if len(parts) == 1:
        return parts[0]
    if len({p.n for p in parts}) != 1:
        raise ValueError("concat_rollouts: batches have different n")
    width = max(p.completion_ids.shape[1] for p in parts)
    device = parts[0].completion_ids.device
    prompts = collate([e for p in parts for e in p.prompts.encodings], pad_id).to(device)
    return Rollouts(prompts,
                    torch.cat([_pad_right(p.completion_ids, width, pad_id) for p in parts]),
                    torch.cat([_pad_right(p.completion_mask, width, 0) for p in parts]),
                    torch.cat([_pad_right(p.logps, width, 0.0) for p in parts]),
                    [t for p in parts for t in p.texts], parts[0].n,
                    torch.cat([_pad_right(p.behaviour_logps, width, 0.0) for p in parts]))


def renumber_groups(inputs: list, n: int) -> list:
    """Reward inputs of a joined batch, their `group` index set to the row's group."""
    return [dataclasses.replace(x, group=i // n) for i, x in enumerate(inputs)]


def mini_batch_rows(n_groups: int, n: int, mini_batches: int) -> list[list[int]]:
    """Rows of each mini-batch: the groups split into `mini_batches` contiguous runs.

    Args:
        n_groups: prompt groups in the batch.
        n: completions per group.
        mini_batches: how many mini-batches (capped at `n_groups`).

    Returns:
        One list of row indices per mini-batch, covering every row once.
    """
    chunks = torch.arange(n_groups).tensor_split(min(mini_batches, n_groups))
    return [group_rows(chunk.tolist(), n) for chunk in chunks]


def micro_batch_rows(rows: list[int], n: int, lengths: torch.Tensor, groups_per_micro: int) -> list[list[int]]:
    """Split a mini-batch (whole groups, group-major) into micro-batches of whole groups, bucketed
    by length: groups are sorted by their longest row, so each micro-batch pads little.

    Args:
        rows: the mini-batch's row indices (n consecutive rows per group).
        n: completions per group.
        lengths: [N] tokens of every row of the full batch (prompt + completion).
        groups_per_micro: groups per micro-batch; 0 = one micro-batch holding everything.

    Returns:
        The micro-batches' row lists, covering `rows` once.
    """
    groups = [rows[i:i + n] for i in range(0, len(rows), n)]
    if groups_per_micro <= 0 or groups_per_micro >= len(groups):
        return [rows]
    groups.sort(key=lambda g: int(lengths[g].max()))
    return [[r for g in groups[i:i + groups_per_micro] for r in g] for i in range(0, len(groups), groups_per_micro)]


def informative_batch(rollout_and_score, batch_iter, want: int, max_batches: int, pad_id: int, comm=LOCAL):
    """DAPO dynamic sampling: roll out batches until every rank has kept `want` prompt groups
    whose rewards differ, or `max_batches` batches were tried; join the kept groups into one
    step batch. Every rank trains on as many groups as the rank that kept fewest (their
    forwards are collective), so the global kept count is that times the world size.

    If no group of any rank was informative, the last batch is used as it is (its advantages
    are 0; only the KL and entropy terms act).

    Returns:
        (rollouts, inputs, scored, skipped media, stats). `scored.metrics` cover every batch
        rolled out (means weighted by completions, counts summed); `stats` holds
        sampling/kept_fraction (informative groups / groups rolled out, over every rank) and
        sampling/batches.
    """
    parts, metrics, seen, informative, skipped, kept = [], [], 0, 0, 0, 0
    for tries in range(1, max_batches + 1):
        _, rollouts, inputs, scored, skip = rollout_and_score(next(batch_iter))
        skipped += skip
        metrics.append((scored.metrics, len(inputs)))
        groups = informative_groups(scored.rewards, scored.valid).nonzero().flatten().tolist()
        seen, informative = seen + scored.rewards.shape[0], informative + len(groups)
        groups = groups[:want - kept]
        if groups:
            rows = group_rows(groups, rollouts.n)
            parts.append((select_rows(rollouts, rows, pad_id), [inputs[i] for i in rows], _kept(scored, groups, rows),
                          groups))
            kept += len(groups)
        if comm.all_reduce(kept, "min") >= want:
            break
    stats = {"sampling/kept_fraction": comm.all_reduce(informative) / comm.all_reduce(seen),
             "sampling/batches": tries}
    keep = int(comm.all_reduce(kept, "min"))
    if keep == 0:
        rollouts, inputs, scored = equal_groups(rollouts, inputs, scored, comm, pad_id)
        return rollouts, inputs, scored, skipped, stats
    trimmed = []
    for part_rollouts, part_inputs, sc, groups in parts:
        take = min(len(groups), keep - sum(len(g) for *_, g in trimmed))
        if take == 0:
            break
        if take < len(groups):
            rows = list(range(take * part_rollouts.n))
            part_rollouts, part_inputs = select_rows(part_rollouts, rows, pad_id), part_inputs[:len(rows)]
            sc = _kept(sc, list(range(take)), rows)
        trimmed.append((part_rollouts, part_inputs, sc, groups[:take]))
    kept_scores = [sc for _, _, sc, _ in trimmed]
    joined = type(scored)(torch.cat([sc.rewards for sc in kept_scores]), torch.cat([sc.valid for sc in kept_scores]),
                          merge_metrics(metrics), {name: Outcome.concat([sc.outcomes[name] for sc in kept_scores])
                                                   for name in kept_scores[0].outcomes})
    inputs = renumber_groups([x for _, part_inputs, _, _ in trimmed for x in part_inputs], rollouts.n)
    return concat_rollouts([r for r, _, _, _ in trimmed], pad_id), inputs, joined, skipped, stats


def equal_groups(rollouts, inputs, scored, comm, pad_id: int):
    """Cut this rank's batch to as many prompt groups as the rank with fewest has (a sample
    skipped for broken media leaves its rank one short): every rank then runs the same number
    of (collective) forwards and optimizer steps."""
    groups = scored.rewards.shape[0]
    keep = int(comm.all_reduce(groups, "min"))
    if keep == groups:
        return rollouts, inputs, scored
    log.warning("rank %d: training on %d of its %d prompt groups this step (another rank has only %d)",
                comm.rank, keep, groups, keep)
    rows = list(range(keep * rollouts.n))
    return select_rows(rollouts, rows, pad_id), inputs[:len(rows)], _kept(scored, list(range(keep)), rows)


def _kept(scored, groups: list[int], rows: list[int]):
    """The `ScoredBatch` of prompt groups `groups` (completion rows `rows`), per-reward outcomes
    included (the trajectories record them); its metrics stay those of the whole batch."""
    return type(scored)(scored.rewards[groups], scored.valid[groups], scored.metrics,
                        {name: o.select(rows) for name, o in scored.outcomes.items()})

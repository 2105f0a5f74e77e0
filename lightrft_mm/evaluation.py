"""`lightrft-mm eval CHECKPOINT --data DIR [DIR ...]`: evaluate a saved checkpoint.

The numbers are those of the trainer's own evaluation (`lightrft_mm.trainer.evaluate`): greedy
`accuracy` is the mean of the accuracy reward over greedy completions, what the run's
`eval/accuracy` and summary.json's `after` report. With `--n K` (K > 1) it also samples K
completions per prompt at `--temperature` and reports pass@k (unbiased estimator; a completion
is correct when its accuracy reward is above `--correct-above`, 0.5 by default) and mean@K (the
mean of the accuracy reward over the K completions).

Defaults come from the run's config.json one folder above the checkpoint (rewards, scoring,
trainer.accuracy_reward, data.system_prompt, data.allow_outside_media, rollout.max_new_tokens /
temperature / top_p / top_k, the image / video / audio sections, model.attn_implementation),
or, with `--config RECIPE`, from a recipe (to evaluate a base model with the prompt, rewards and
answer checking a recipe trains with, e.g. `lightrft-mm eval Qwen/Qwen2.5-VL-7B-Instruct
--config recipes/geo3k/qwen2_5_vl_7b.yaml --data data/geo3k/test`); flags override them.
Without either: rewards [exact_match], accuracy reward exact_match, no system prompt, 64 new
tokens, temperature 1.0 and the processors' default settings. The model may be a checkpoint
folder, any Hugging Face model folder, or a Hub id (resolved like `model.name_or_path`).

Under torchrun every rank loads the model and evaluates its share of the samples (samples r,
r + world, ...); the scores are gathered and rank 0 prints and writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from lightrft_mm.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/demo/checkpoint-final), any HF model folder, "
                                      "or a Hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="prepared shard folders (or .jsonl files)")
    p.add_argument("--config", type=Path, default=None, metavar="RECIPE",
                   help="take the defaults from this recipe (rewards, accuracy reward, system prompt, sampling, "
                        "media settings) instead of the run's config.json")
    p.add_argument("--rewards", nargs="+", metavar="NAME", default=None,
                   help="rewards to score with, weight 1 each (registered names, package.module:fn or file.py:fn; "
                        "default: the run's rewards, else exact_match)")
    p.add_argument("--accuracy-reward", default=None,
                   help="reward whose mean is `accuracy` (default: the run's trainer.accuracy_reward, else "
                        "exact_match)")
    p.add_argument("--n", type=int, default=1, metavar="K",
                   help="also sample K completions per prompt (K > 1) for pass@k and mean@K")
    p.add_argument("--k", type=int, nargs="+", default=None, help="the k of pass@k (default: 1 and K)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature of --n (default: the run's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling of --n (default: the run's)")
    p.add_argument("--correct-above", type=float, default=None,
                   help="a sampled completion counts as correct when its accuracy reward is above this (default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the run's rollout.max_new_tokens, else 64")
    p.add_argument("--system-prompt", default=None, help="default: the run's data.system_prompt, else none")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate the first N samples only (0 = all)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0, help="seed of the --n sampling (rank r uses seed + r)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="write the results (and each sample's greedy completion) "
                                                          "as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from lightrft_mm.strategy.dist import Collectives, init_process_group, launched_world_size, resolve_device

    settings = eval_settings(args)  # every flag and path checked before the model loads
    comm = Collectives()
    comm.device = resolve_device(args.device)
    if launched_world_size() > 1:
        init_process_group(comm.device, timeout_s=600.0)
    try:
        result = evaluate_checkpoint(args, settings, comm)
        if comm.is_main:
            print(report(result))
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_name(args.out.name + ".tmp")
                tmp.write_text(json.dumps(result, indent=2) + "\n")
                tmp.replace(args.out)
                print(f"wrote {args.out}")
    finally:
        comm.close()
    return 0


def eval_settings(args: argparse.Namespace) -> dict:
    """The evaluation's settings: flags over the run's config.json over the defaults; raises
    ConfigError / ModelError for a missing checkpoint, bad flags and unknown reward names."""
    from lightrft_mm.config import (AudioConfig, DataConfig, ImageConfig, RewardSpec, RolloutConfig, ScoringConfig,
                                    TrainerConfig, VideoConfig)
    from lightrft_mm.rewards import config_problems

    from lightrft_mm.config import load_config, to_dict
    from lightrft_mm.models.hub import is_hub_id, resolve

    if is_hub_id(args.checkpoint):
        folder = resolve(args.checkpoint)  # ModelError when offline without a cached copy
    else:
        folder = Path(args.checkpoint)
        if not folder.is_dir():
            raise ModelError(f"checkpoint {folder} does not exist. Fix: a checkpoint folder of a run (e.g. "
                             "runs/demo/checkpoint-final), a Hugging Face model folder, or a Hub id.")
    if args.config is not None:
        run_file = args.config
        raw = to_dict(load_config(args.config))  # ConfigError names the recipe's bad keys
    else:
        run_file = folder.resolve().parent / "config.json"
        raw = json.loads(run_file.read_text()) if run_file.is_file() else {}
    section = {k: v for k, v in raw.items() if isinstance(v, dict)}
    # The run's sections, their defaults where the run (or a plain model folder) has none.
    data, rollout = _section(DataConfig, section.get("data")), _section(RolloutConfig, section.get("rollout"))
    problems = []
    if args.n < 1:
        problems.append(f"--n: {args.n} is below 1. Fix: --n 8 (samples per prompt for pass@k), or leave it out.")
    ks = sorted(set(args.k or ([1, args.n] if args.n > 1 else [])))
    if args.k and args.n < 2:
        problems.append("--k: needs --n K with K > 1 (pass@k is over sampled completions).")
    bad_k = [k for k in ks if not 1 <= k <= args.n]
    if args.n > 1 and bad_k:
        problems.append(f"--k: {bad_k} outside 1..{args.n} (--n). Fix: k between 1 and --n.")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--max-samples", args.max_samples, 0)):
        if value is not None and value < low:
            problems.append(f"{flag}: {value} is below {low}.")
    if args.temperature is not None and args.temperature <= 0:
        problems.append(f"--temperature: {args.temperature} must be > 0 (greedy is always evaluated).")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append(f"--top-p: {args.top_p} must be in (0, 1].")
    if args.rewards is not None:
        specs = [RewardSpec(name=n) for n in args.rewards]
    elif "rewards" in raw:
        specs = [_section(RewardSpec, r) for r in raw["rewards"]]
    else:
        specs = [RewardSpec(name="exact_match")]
    accuracy = args.accuracy_reward or _section(TrainerConfig, section.get("trainer")).accuracy_reward
    found = config_problems(specs, accuracy)
    if args.rewards is not None:  # name the flag, not a config key
        found = [p.replace("rewards[", "--rewards[", 1) if p.startswith("rewards[") else p for p in found]
    problems += [p.replace("trainer.accuracy_reward", "--accuracy-reward") for p in found]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"eval: {len(problems)} problem(s):\n{lines}\n(lightrft-mm rewards list names the "
                          "registered rewards.)")
    return {
        "checkpoint": folder, "run_config": run_file if raw else None, "specs": specs, "accuracy_reward": accuracy,
        "scoring": _section(ScoringConfig, section.get("scoring", {})),
        "system_prompt": args.system_prompt if args.system_prompt is not None else data.system_prompt,
        "allow_outside_media": bool(data.allow_outside_media),
        "max_new_tokens": args.max_new_tokens or rollout.max_new_tokens,
        "temperature": args.temperature or rollout.temperature,
        "top_p": args.top_p or rollout.top_p, "top_k": rollout.top_k, "ks": ks,
        "correct_above": 0.5 if args.correct_above is None else args.correct_above,
        "image": _section(ImageConfig, section.get("image", {})),
        "video": _section(VideoConfig, section.get("video", {})),
        "audio": _section(AudioConfig, section.get("audio", {})),
        "attn_implementation": section.get("model", {}).get("attn_implementation"),
        "trust_remote_code": bool(section.get("model", {}).get("trust_remote_code", False)),
    }


def evaluate_checkpoint(args: argparse.Namespace, settings: dict, comm) -> dict:
    """Greedy (and with --n, sampled) evaluation of the checkpoint on this rank's share; the
    results of every rank, on every rank."""
    import torch

    from lightrft_mm.datasets.loader import drop_unsupported, load_samples
    from lightrft_mm.models import load_pretrained
    from lightrft_mm.processors import make_adapter
    from lightrft_mm.rewards import build_reward_set
    from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
    from lightrft_mm.trainer.evaluate import by_source, sampled_metrics, score_samples, summarize

    s = settings
    samples = load_samples(args.data, allow_outside_media=s["allow_outside_media"])  # DataError: no shards, bad rows
    model, processor = load_pretrained(s["checkpoint"], trust_remote_code=s["trust_remote_code"])
    if s["attn_implementation"] and model.config._attn_implementation != s["attn_implementation"]:
        model.set_attn_implementation(s["attn_implementation"])
    model.to(comm.device)
    adapter = make_adapter(model, processor, system_prompt=s["system_prompt"] or None,
                           image=s["image"], video=s["video"], audio=s["audio"])
    samples, _ = drop_unsupported(samples, adapter.modalities, where="--data")
    if args.max_samples:
        samples = samples[:args.max_samples]
    if not samples:
        raise ConfigError(f"--data: no sample of {', '.join(map(str, args.data))} has media this model takes "
                          f"({', '.join(sorted(adapter.modalities)) or 'text only'}).")
    fns = build_reward_set(s["specs"], s["scoring"]).including(s["accuracy_reward"])
    engine = HFRolloutEngine(model, adapter)  # every rank holds the whole model: no collective forwards
    common = dict(batch_size=args.batch_size, comm=comm, system_prompt=s["system_prompt"] or None,
                  progress=not args.no_progress)
    greedy = score_samples(engine, adapter, samples, fns, n=1, **common,
                           sampling=SamplingParams(max_new_tokens=s["max_new_tokens"], greedy=True))
    acc = s["accuracy_reward"]
    result = {"checkpoint": str(s["checkpoint"]), "data": [str(d) for d in args.data],
              "run_config": str(s["run_config"]) if s["run_config"] else None, "world_size": comm.world_size,
              "accuracy_reward": acc, "rewards": fns.names(), "system_prompt": s["system_prompt"],
              "max_new_tokens": s["max_new_tokens"], "greedy": summarize(greedy, acc),
              "by_source": by_source(greedy, acc)}
    if args.n > 1:
        torch.manual_seed(args.seed + comm.rank)
        sampling = SamplingParams(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                                  top_p=s["top_p"], top_k=s["top_k"])
        sampled = score_samples(engine, adapter, samples, fns, n=args.n, sampling=sampling, **common)
        result["sampled"] = {"per_prompt": args.n, "temperature": s["temperature"], "top_p": s["top_p"],
                             "top_k": s["top_k"],
                             "correct_above": s["correct_above"], "seed": args.seed,
                             **sampled_metrics(sampled, acc, s["ks"], s["correct_above"]),
                             "rewards": summarize(sampled, acc),
                             "by_source": {src: sampled_metrics([r for r in sampled if r["source"] == src], acc,
                                                                s["ks"], s["correct_above"])
                                           for src in result["by_source"]}}
    result["samples"] = [{"id": r["id"], "source": r["source"], "completion": r["completions"][0],
                          "tokens": r["lengths"][0], "rewards": {k: v[0] for k, v in r["rewards"].items()}}
                         for r in greedy]
    return result


def report(result: dict) -> str:
    """The results as a readable table (the numbers of the JSON, fewer digits, but `accuracy`
    exact)."""
    g, acc = result["greedy"], result["accuracy_reward"]
    names = result["rewards"]
    lines = [f"eval: {result['checkpoint']} on {g['n']} samples ({', '.join(result['data'])}), "
             f"{result['world_size']} process(es)",
             f"accuracy: {g['accuracy']!r} (greedy, mean of {acc})"]
    rows = [("source", "n", "accuracy", "reward", *names)]
    for source, m in [("all", g), *result["by_source"].items()]:
        rows.append((source, str(m["n"]), _f(m["accuracy"]), _f(m["reward"]),
                     *(_f(m.get(f"reward/{k}")) for k in names)))
    if "sampled" in result:
        sp = result["sampled"]
        keys = [k for k in sp if k.startswith(("pass@", "mean@"))]
        lines += _table(rows)
        lines.append(f"sampled: {sp['per_prompt']} per prompt at temperature {sp['temperature']:g}; correct = {acc} > "
                     f"{sp['correct_above']:g}")
        rows = [("source", "n", *keys)]
        for source, m in [("all", sp), *sp["by_source"].items()]:
            rows.append((source, str(m["n"]), *(_f(m[k]) for k in keys)))
    return "\n".join(lines + _table(rows))


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _f(value) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def _section(cls, raw: dict):
    """A config section from a run's config.json (written from a validated config): its known keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (raw or {}).items() if k in names})

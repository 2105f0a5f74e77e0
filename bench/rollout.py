"""Rollout throughput: the HF engine vs the vLLM engine on the same prompts.

    .venv/bin/python bench/rollout.py                       # tiny Qwen2.5-VL, 16 image prompts x 8
    .venv/bin/python bench/rollout.py --tokenizer qwen --new-tokens 64 --rounds 3

Both engines sample from the same tiny model (built offline, fp32) the same prompts (synthetic
colour images, 84x84), n completions each, temperature 1, up to --new-tokens new tokens, with
`rollout.*`'s special-token suppression. The vLLM engine is started as `rollout.vllm.mode=colocate`
starts it (its own process, `.venv-vllm` from `make vllm`); its start-up is timed apart. After
each round the weights are synced (timed) as after an optimizer step, and the engine's resident
memory (its process tree) is printed, so growth across steps (an encoder cache that is never
freed) shows. Prints, per engine, median seconds per rollout, completions/s and generated
tokens/s (tokens up to and including end-of-turn), and the ratio. 2 torch threads for HF; the
vLLM engine uses what its CPU backend takes (set OMP_NUM_THREADS / VLLM_CPU_OMP_THREADS_BIND).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (Linux /proc), MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl", "llava", "qwen2"])
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "qwen"])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)

    from lightrft_mm.config import load_config
    from lightrft_mm.datasets.loader import load_samples
    from lightrft_mm.datasets.synthetic import ensure_synthetic
    from lightrft_mm.models import load_policy
    from lightrft_mm.processors import make_adapter
    from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
    from lightrft_mm.rollout.vllm import start_engine
    from lightrft_mm.strategy import STRATEGIES

    root = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    cfg = load_config(None, [f"model.name_or_path=tiny:{args.family}", f"model.tiny_tokenizer={args.tokenizer}",
                             "data.synthetic=colors", f"data.train=[{root / 'data'}]", "rollout.engine=vllm",
                             "rollout.vllm.max_model_len=1024"])
    ensure_synthetic(cfg.data)
    samples = load_samples([str(root / "data")])[:args.prompts]
    model, processor = load_policy(cfg.model, seed=0)
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(samples)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    strategy = STRATEGIES.get("single")(cfg.strategy, max_grad_norm=1.0)
    model, _ = strategy.prepare(model, lambda params: torch.optim.SGD(params, lr=0.0))

    def timed(engine, label, after=None):
        times, tokens = [], []
        for r in range(args.rounds + 1):  # the first is warm-up
            t = time.time()
            out = engine.generate(prompts, args.n, sampling)
            dt = time.time() - t
            extra = after() if after else ""
            if r:
                times.append(dt)
                tokens.append(int(out.completion_mask.sum()))
            print(f"  {label} round {r}{' (warm-up)' if not r else ''}: {dt:.2f} s {extra}", flush=True)
        s = statistics.median(times)
        return s, args.prompts * args.n / s, statistics.median(tokens) / s

    results = {}
    if not args.skip_hf:
        results["hf"] = timed(HFRolloutEngine(model, adapter), "hf")
    t = time.time()
    engine = start_engine(cfg, model, processor, adapter, strategy, folder=root / "engine", seed=0,
                          dtype="float32", model_type=model.config.model_type, lora_scaling=None)
    start_s = time.time() - t
    print(f"  vllm engine start: {start_s:.1f} s", flush=True)

    def sync():
        engine.sync(strategy)
        rss = tree_rss_mib(engine.process.pid)
        return f"(weight sync {engine.sync_seconds * 1000:.0f} ms, engine RSS {rss:.0f} MiB)"

    try:
        results["vllm"] = timed(engine, "vllm", after=sync)
    finally:
        engine.close()
    print(f"\n{args.family}, {args.tokenizer} tokenizer: {args.prompts} prompts x {args.n}, "
          f"<= {args.new_tokens} new tokens, median of {args.rounds}")
    print(f"{'engine':8} {'s/rollout':>10} {'completions/s':>14} {'tokens/s':>10}")
    for name, (s, cps, tps) in results.items():
        print(f"{name:8} {s:10.2f} {cps:14.1f} {tps:10.1f}")
    if "hf" in results:
        print(f"vllm / hf: {results['hf'][0] / results['vllm'][0]:.2f}x completions/s "
              f"(engine start {start_s:.0f} s, once per run)")


if __name__ == "__main__":
    main()

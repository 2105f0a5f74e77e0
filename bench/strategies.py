"""Step time and memory of the training strategies, and one GRPO run of a 3B VLM on a GPU.

    .venv/bin/python bench/strategies.py                    # the CPU table (~2.5 min on 2 cores)
    .venv/bin/python bench/strategies.py --only deepspeed --steps 8 --set rollout.max_new_tokens=16
    .venv/bin/python bench/strategies.py --gpu              # one CUDA GPU; meant to end within 5 min
    .venv/bin/python bench/strategies.py --gpu --dry-run    # the GPU path's plumbing, on a CPU

CPU table: the colours demo recipe (tiny Qwen2.5-VL, 16 prompts x 8 completions, <= 8 new
tokens) without warm-up or evaluation, once per strategy / precision / process count, each
through the trainer's CLI in its own process(es) (torchrun for fsdp2 and deepspeed). Every
run uses every core: threads per process = cores / processes. The first `--skip` steps are
warm-up. s/step is the median `time/step` of metrics.jsonl (the slowest rank's).

Memory: every rank runs `lightrft_mm.cli.main` inside a wrapper (this file, `--rank-worker`)
that reports `getrusage(RUSAGE_SELF).ru_maxrss` of its own process at exit (torchrun's
launcher process is not counted), and on a GPU `torch.cuda.max_memory_allocated()`. The
wrapper also times every `HFRolloutEngine.generate` call and counts its prompt and completion
tokens, for the generation throughput and MFU of `--gpu`.

--gpu: a Qwen2.5-VL-3B-shaped model (the public Qwen2.5-VL-3B-Instruct config, random weights,
the real Qwen tokenizer) trained with fsdp2 + bf16 on one GPU; see `gpu_run`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # torchrun runs this file as a script: lightrft_mm need not be installed
RECIPE = ROOT / "recipes" / "demo" / "colors.yaml"
# (strategy, precision, ZeRO stage, processes)
CPU_RUNS = ([("single", p, 0, 1) for p in ("fp32", "bf16")]
            + [("fsdp2", p, 0, n) for n in (1, 2) for p in ("fp32", "bf16")]
            + [("deepspeed", p, z, n) for z in (2, 3) for n in (1, 2) for p in ("fp32", "bf16")])
COMMON = ["warmup.steps=0", "data.eval=[]", "trainer.eval_every=0", "trainer.overwrite=true",
          "logging.progress=false", "logging.plot=false", "logging.completions=0"]

# Qwen/Qwen2.5-VL-3B-Instruct's config.json; the vision values it leaves out are those of
# transformers' Qwen2_5_VLVisionConfig defaults, written out.
TEXT_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000,
               rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                 in_channels=3, out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                 window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
TOKEN_IDS_3B = {"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                "<|video_pad|>": 151656, "<|endoftext|>": 151643, "<|im_end|>": 151645}
# --dry-run: the same architecture with 2 text and 2 vision layers, narrow enough for one CPU step.
SHRUNK_TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
SHRUNK_VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256,
                     fullatt_block_indexes=[1])
# Estimates: activations of 16 rows x ~300 tokens x 36 layers without checkpointing are ~25 GB, next
# to 60 GB of fp32 weights, gradients and Adam state; all 64 rows in one pass would not fit in 139 GiB.
GPU_SETTINGS = dict(batch=8, n=8, new_tokens=128, steps=6, micro_batch_groups=2, image_size=336)
DRY_SETTINGS = dict(batch=2, n=2, new_tokens=8, steps=1, micro_batch_groups=0, image_size=84)


# ------------------------------------------------------------------------------- rank wrapper --

def rank_worker(report_dir: Path, argv: list[str]) -> int:
    """Run `lightrft-mm <argv>` in this process; write this rank's peak memory and rollouts."""
    import torch

    from lightrft_mm.cli import main
    from lightrft_mm.rollout.hf import HFRolloutEngine

    rollouts, generate = [], HFRolloutEngine.generate

    def sync():
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def timed_generate(self, prompts, n, sampling):
        sync()
        start = time.perf_counter()
        out = generate(self, prompts, n, sampling)
        sync()
        rollouts.append({"s": time.perf_counter() - start, "prompt_tokens": int(out.prompts.attention_mask.sum()),
                         "completion_tokens": int(out.completion_mask.sum())})
        return out

    HFRolloutEngine.generate = timed_generate
    try:
        return main(argv)
    finally:
        report_dir.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
        (report_dir / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_peak_mib": cuda, "rollouts": rollouts}))


def launch(out: Path, procs: int, overrides: list[str], *, threads: int, torchrun: bool, timeout: float):
    """Train `RECIPE` with `overrides` into `out`; returns (step rows of metrics.jsonl, rank reports)."""
    worker = [str(Path(__file__).resolve()), "--rank-worker", str(out / "ranks"), "train", str(RECIPE),
              *COMMON, *overrides, f"trainer.output_dir={out / 'run'}"]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        worker = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master-port", str(port), *worker]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lightrft_mm" / "torch_extensions"))
    # Own session: on a timeout the whole group (torchrun and its ranks) goes, none keeps the GPU.
    proc = subprocess.Popen([sys.executable, *worker], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
        metrics = out / "run" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        raise SystemExit(f"{log[-4000:]}\nrun stopped after {timeout:.0f} s (timeout); time/step of the steps done: "
                         f"{[round(r['time/step'], 3) for r in rows if 'time/step' in r]}")
    if proc.returncode:
        raise SystemExit(f"run failed (exit {proc.returncode}):\n{log[-4000:]}")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    reports = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    return [r for r in rows if "time/step" in r], reports


# ---------------------------------------------------------------------------------- CPU table --

def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process's finished children):
    their difference over a run is what other processes took from it (Linux /proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def cpu_table(args) -> None:
    from lightrft_mm.prepare import prepare_synthetic

    cores = len(os.sched_getaffinity(0))
    runs = [r for r in CPU_RUNS if not args.only or args.only in (r[0], f"zero{r[2]}")]
    if not runs:
        raise SystemExit(f"--only {args.only}: matches none of single, fsdp2, deepspeed, zero2, zero3.")
    print(f"{len(runs)} runs x {args.steps} steps ({args.skip} warm-up), {cores} cores"
          + (f"; with {' '.join(args.set)}" if args.set else ""), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_synthetic("colors", Path(tmp) / "colors-train", n=1024, seed=1)
        for i, (name, precision, zero, procs) in enumerate(runs):
            overrides = [f"strategy.name={name}", f"strategy.precision={precision}", f"data.train=[{data}]",
                         f"trainer.max_steps={args.steps}", *([f"strategy.zero_stage={zero}"] if zero else []),
                         *args.set]
            threads = max(cores // procs, 1)
            (machine, ours), start = cpu_seconds(), time.time()
            rows, reports = launch(Path(tmp) / f"run{i}", procs, overrides, threads=threads,
                                   torchrun=name != "single", timeout=args.timeout or 600)
            (machine_end, ours_end), wall = cpu_seconds(), time.time() - start
            other = max(machine_end - machine - (ours_end - ours), 0.0) / (wall * cores)
            rss = [r["peak_rss_mib"] for r in reports]
            rollout = [max(r["rollouts"][i]["s"] for r in reports) for i in range(args.skip, len(rows))]
            label = f"{name}{f' zero{zero}' if zero else ''}"
            step_s = statistics.median(r["time/step"] for r in rows[args.skip:])
            results.append((label, precision, procs, threads, step_s, statistics.median(rollout), max(rss), sum(rss),
                            other))
            print(f"{label:>15} {precision} x{procs}: {results[-1][4]:.3f} s/step", flush=True)
    print("\npeak RSS: ru_maxrss of each rank's own process (getrusage RUSAGE_SELF at exit; torchrun's "
          "launcher not counted); per process = the largest rank. rollout: median seconds of the step in "
          "HFRolloutEngine.generate (slowest rank). other CPU: the share of the machine's CPU "
          "time other processes used during the run (> a few % = the numbers are disturbed)")
    print(f"{'strategy':<16} {'precision':<9} {'procs':>5} {'threads':>7} {'s/step':>7} {'rollout':>7} "
          f"{'RSS/proc MiB':>12} {'RSS sum MiB':>11} {'other CPU':>9}")
    for label, precision, procs, threads, step, rollout, rss, total, other in results:
        print(f"{label:<16} {precision:<9} {procs:>5} {threads:>7} {step:7.3f} {rollout:7.3f} {rss:12.0f} "
              f"{total:11.0f} {other:9.0%}")


# ------------------------------------------------------------------------------------ GPU run --

def build_model(folder: Path, *, shrunk: bool, image_size: int) -> dict:
    """Save a random-weight Qwen2.5-VL-3B-shaped model (or, `shrunk`, its 2-layer version) in bf16
    with the Qwen processor into `folder`; returns parameter counts of the full 3B shape."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from lightrft_mm.models.tiny import build_tiny

    hf_logging.disable_progress_bar()
    # The processor of tiny:qwen2_5_vl with the real Qwen tokenizer; its small model is dropped.
    _, processor = build_tiny("qwen2_5_vl", tokenizer="qwen", image_size=image_size)
    tok = processor.tokenizer
    found = {t: tok.convert_tokens_to_ids(t) for t in TOKEN_IDS_3B}
    if found != TOKEN_IDS_3B:
        raise SystemExit(f"the Qwen tokenizer's special ids {found} differ from Qwen2.5-VL's {TOKEN_IDS_3B}")

    def config(text: dict, vision: dict):
        ids = {"image_token_id": found["<|image_pad|>"], "video_token_id": found["<|video_pad|>"],
               "vision_start_token_id": found["<|vision_start|>"], "vision_end_token_id": found["<|vision_end|>"]}
        text = dict(text, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)

    with torch.device("meta"):  # the full shape, without memory: its parameter counts for the FLOPs
        full = Qwen2_5_VLForConditionalGeneration(config(TEXT_3B, VISION_3B))
    counts = {"total": sum(p.numel() for p in full.parameters()),
              "vision": sum(p.numel() for p in full.model.visual.parameters())}
    counts["language"] = counts["total"] - counts["vision"]
    cfg = config(dict(TEXT_3B, **SHRUNK_TEXT), dict(VISION_3B, **SHRUNK_VISION)) if shrunk else full.config
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() and not shrunk else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)  # 3B: ~2 s on a GPU, minutes on CPU
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    counts["built"] = sum(p.numel() for p in model.parameters())
    counts["built_language"] = counts["built"] - sum(p.numel() for p in model.model.visual.parameters())
    counts["tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counts


def gpu_run(args) -> None:
    """fsdp2 + bf16 GRPO steps of the 3B-shaped model on one GPU (one torchrun process), then
    s/step, generated tokens/s, peak GPU memory and MFU. `--dry-run`: the shrunk model, one
    step, on the CPU, to check the plumbing (its numbers mean nothing)."""
    import torch

    from lightrft_mm.prepare import prepare_synthetic

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device. Fix: run it on a GPU machine, or add --dry-run.")
    s = DRY_SETTINGS if args.dry_run else GPU_SETTINGS
    steps = args.steps or s["steps"]
    skip = min(args.skip, steps - 1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        counts = build_model(model_dir, shrunk=args.dry_run, image_size=s["image_size"])
        print(f"Qwen2.5-VL-3B shape: {counts['total'] / 1e9:.3f}B parameters ({counts['language'] / 1e9:.3f}B "
              f"language incl. the tied embedding, {counts['vision'] / 1e9:.3f}B vision); built "
              f"{'the 2-layer shrunk model' if args.dry_run else 'it'}: {counts['built'] / 1e6:.1f}M, tied "
              f"head {counts['tied']}; {time.time() - started:.0f} s", flush=True)
        data = prepare_synthetic("colors", Path(tmp) / "colors-train", n=256, seed=1)
        overrides = [f"model.name_or_path={model_dir}", "model.dtype=bfloat16", "strategy.name=fsdp2",
                     "strategy.precision=bf16", f"strategy.device={'cpu' if args.dry_run else 'cuda'}",
                     f"data.train=[{data}]", f"data.batch_size={s['batch']}", f"rollout.n={s['n']}",
                     f"rollout.max_new_tokens={s['new_tokens']}", f"trainer.max_steps={steps}", "trainer.lr=1e-6",
                     f"trainer.micro_batch_groups={s['micro_batch_groups']}", *args.set]
        rows, reports = launch(Path(tmp) / "gpu", 1, overrides, threads=len(os.sched_getaffinity(0)),
                               torchrun=True, timeout=args.timeout or 240)
    per_step = [{k: sum(r["rollouts"][i][k] for r in reports) for k in ("s", "prompt_tokens", "completion_tokens")}
                for i in range(len(rows))]  # one generate call per step and rank (no dynamic sampling)
    timed = list(zip(rows, per_step))[skip:]
    step_s = statistics.median(r["time/step"] for r, _ in timed)
    gen = statistics.median(g["completion_tokens"] for _, g in timed)
    trained = statistics.median(g["prompt_tokens"] + g["completion_tokens"] for _, g in timed)
    gen_tps = statistics.median(g["completion_tokens"] / g["s"] for _, g in timed)
    n_params = counts["built_language"]
    flops = 6 * n_params * trained + 2 * n_params * gen
    cuda = [r["cuda_peak_mib"] for r in reports if r["cuda_peak_mib"] is not None]
    print(f"\n{'DRY RUN (CPU, shrunk model; numbers meaningless)' if args.dry_run else 'GPU'}: fsdp2 bf16, "
          f"{len(reports)} process, {s['batch']} prompts x {s['n']} completions, <= {s['new_tokens']} new tokens, "
          f"{len(timed)} timed step(s) after {skip} warm-up; total wall {time.time() - started:.0f} s")
    print(f"s/step                {step_s:.3f}")
    print(f"generated tokens/s    {gen_tps:.0f} (completion tokens / HFRolloutEngine.generate time); "
          f"{gen / step_s:.0f} over the whole step; {gen:.0f} tokens/step")
    print("peak GPU memory       " + (f"{max(cuda) / 1024:.1f} GiB (torch.cuda.max_memory_allocated, largest rank)"
                                       if cuda else "n/a (no CUDA)"))
    print(f"peak RSS              {max(r['peak_rss_mib'] for r in reports):.0f} MiB per process")
    print(f"MFU                   {flops / step_s / (args.peak_tflops * 1e12):.1%} = (6 N T_train + 2 N T_gen) / "
          f"s_step / peak; N = {n_params / 1e9:.3f}B language-model parameters (tied embedding once, vision tower "
          f"left out), T_train = {trained:.0f} prompt + completion tokens of the B*n rows, T_gen = {gen:.0f}, "
          f"peak = {args.peak_tflops:g} TFLOP/s; attention scores, vision tower and rollout prefill not counted")


def main() -> None:
    if sys.argv[1:2] == ["--rank-worker"]:  # a rank: the rest of argv is the trainer CLI's
        sys.exit(rank_worker(Path(sys.argv[2]), sys.argv[3:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (CPU 12, --gpu 6, --dry-run 1)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps of each run left out (default 2)")
    p.add_argument("--only", metavar="NAME", help="CPU runs of one strategy: single, fsdp2, deepspeed, zero2, zero3")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help="config override passed to every run, e.g. --set rollout.max_new_tokens=16")
    p.add_argument("--gpu", action="store_true", help="the 3B-shaped fsdp2 bf16 run on one CUDA GPU")
    p.add_argument("--dry-run", action="store_true", help="with --gpu: the shrunk model, one step, on the CPU")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (default 989: H100 / H200 SXM)")
    p.add_argument("--timeout", type=float, help="seconds one training run may take (CPU 600, --gpu 240)")
    args = p.parse_args()
    if args.gpu:
        return gpu_run(args)
    args.steps = args.steps or 12
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must be larger than --skip ({args.skip}).")
    cpu_table(args)


if __name__ == "__main__":
    main()

"""GRPO step throughput of lightrft_mm, optionally side by side with TRL's GRPOTrainer.

    .venv/bin/python bench/grpo_step.py --config tiny --steps 12
    .venv/bin/python bench/grpo_step.py --config vision-heavy --vs-trl --rounds 3
    .venv/bin/python bench/grpo_step.py --config vocab --vs-trl --before 7274f3e~1 --rounds 1 --steps 5 --skip 1
    .venv/bin/python bench/grpo_step.py --padding-free

Both sides train the same saved tiny Qwen2.5-VL on the same images and prompt: 2 prompts x 8
completions per step, at most 8 new tokens, temperature 1, no KL, fp32, 2 torch threads, a
length reward, gradient checkpointing off. Each run is its own process (clean peak RSS). The
first `--skip` steps of a run are warm-up and not counted. With `--vs-trl` the two alternate
(ours, TRL, ours, TRL, ...) for `--rounds` rounds, the step times of all rounds are pooled and
the medians compared. TRL lives in `.bench-trl/`, a separate environment this script creates
from `bench/requirements-trl.txt` on first use; it is never a dependency of the package.
`--before REV` adds a third side: this package as of git revision REV (a temporary worktree, run
with its own bench worker), so a change is measured against the code before it in one run.

Configs:
  tiny          text hidden 64 x 2 layers, vision depth 2 (width 32), 84x84 images (9 visual tokens)
  vision-heavy  same text model, vision depth 8 (width 128), 448x448 images (256 visual tokens)
  vocab         the tiny model with the real 151,665-token Qwen tokenizer, 64 new tokens: the
                output head and its [tokens, vocabulary] logits dominate time and memory

Prints median s/step, samples/s, generated tokens/s and peak RSS per side, and the ratio.

`--padding-free` instead times one training forward + backward (`forward_logprobs`) of 2 prompts
x 8 completions whose lengths are drawn uniformly from 1..--max-len, padded and packed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_ENV = ROOT / ".bench-trl"
CONFIGS = {  # build_tiny arguments, plus the new tokens per completion
    "tiny": dict(image_size=84, vision_depth=2, vision_width=32, new_tokens=8),
    "vision-heavy": dict(image_size=448, vision_depth=8, vision_width=128, new_tokens=8),
    "vocab": dict(image_size=84, vision_depth=2, vision_width=32, tokenizer="qwen", new_tokens=64),
}
PROMPTS, N, THREADS, LR = 2, 8, 2, 1e-5
QUESTION = "What colour is this image? Answer in one word."


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ setup --

def make_assets(config: str, root: Path, prompts: int) -> tuple[Path, Path]:
    """Save the tiny model and write `prompts` images + a JSONL of samples; returns (model, data)."""
    import numpy as np
    from PIL import Image

    from lightrft_mm.models.tiny import build_tiny

    model, processor = build_tiny("qwen2_5_vl", seed=0, **{k: v for k, v in CONFIGS[config].items()
                                                           if k != "new_tokens"})
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    side = CONFIGS[config]["image_size"]
    rng = np.random.default_rng(0)
    (root / "media").mkdir()
    rows = []
    for i in range(prompts):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / "media" / f"{i}.png")
        rows.append({"id": str(i), "answer": "red", "messages": [{"role": "user", "content": [
            {"type": "image", "image": f"media/{i}.png"}, {"type": "text", "text": QUESTION}]}]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "length_reward.py").write_text(
        "def length(inputs):\n    return [len(x.completion) / 10 for x in inputs]\n")
    return model_dir, data


def ensure_trl_env() -> Path:
    python = TRL_ENV / "bin" / "python"
    if not python.exists():
        print(f"setting up {TRL_ENV} (once) from bench/requirements-trl.txt ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_ENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["-r", str(ROOT / "bench" / "requirements-trl.txt")], check=True)
        subprocess.run(pip + ["-c", str(ROOT / "constraints-cpu.txt"), "-e", str(ROOT)], check=True)
    return python


# ----------------------------------------------------------------------------------- workers --

def worker_ours(model: Path, data: Path, steps: int, out: Path, overrides: list[str], new_tokens: int) -> dict:
    from lightrft_mm.config import load_config
    from lightrft_mm.trainer.loop import train

    cfg = load_config(ROOT / "recipes" / "demo" / "colors.yaml", [
        f"model.name_or_path={model}", f"data.train=[{data}]", "data.eval=[]",
        f"data.batch_size={PROMPTS}", f"rollout.n={N}", f"rollout.max_new_tokens={new_tokens}",
        "rollout.temperature=1.0", f"rewards=[{{name: '{data.parent / 'length_reward.py'}:length'}}]",
        "algorithm.kl_coef=0.0", "algorithm.entropy_coef=0.0", f"trainer.lr={LR}", "warmup.steps=0",
        f"trainer.max_steps={steps}", "trainer.eval_every=0", f"trainer.output_dir={out}",
        "trainer.overwrite=true", "logging.progress=false", "logging.plot=false", "logging.completions=0",
        *overrides])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r]
    return {"step_s": [r["time/step"] for r in rows],
            "tokens": [r["completion/length"] * PROMPTS * N for r in rows]}


def worker_trl(model: Path, data: Path, steps: int, out: Path, overrides: list[str], new_tokens: int) -> dict:
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightrft_mm.models import load_pretrained

    policy, processor = load_pretrained(model)  # TRL needs the processor object, not a path
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    images = [Image.open(data.parent / r["messages"][0]["content"][0]["image"]).convert("RGB") for r in rows]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": QUESTION}], "image": img}
                                 for img in images])

    def length(completions, **_):
        return [len(c[0]["content"] if isinstance(c, list) else c) / 10 for c in completions]

    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * PROMPTS * N)

    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS * N, num_generations=N,
        max_completion_length=new_tokens, temperature=1.0, beta=0.0, learning_rate=LR, max_steps=steps,
        gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0, shuffle_dataset=True)
    trainer = GRPOTrainer(model=policy, reward_funcs=[length], args=args, train_dataset=dataset,
                          processing_class=processor, callbacks=[Timer()])
    trainer.train()
    return {"step_s": times, "tokens": tokens}


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(THREADS)
    fn = worker_ours if args.worker == "ours" else worker_trl
    with tempfile.TemporaryDirectory() as tmp:
        result = fn(Path(args.model), Path(args.data), args.steps, Path(tmp) / "run", args.set, args.new_tokens)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------- driver --

def launch(side: str, python: Path, model: Path, data: Path, steps: int, overrides: list[str], new_tokens: int,
           before: Path | None = None) -> dict:
    """One run in its own process. The `before` side runs the bench worker of an older revision
    (checked out at `before`), which takes the new-token count as a config override."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    script = Path(__file__).resolve()
    tokens = [f"--new-tokens={new_tokens}"]
    if side == "before":
        env["PYTHONPATH"] = str(before)
        script, tokens = before / "bench" / "grpo_step.py", [f"--set=rollout.max_new_tokens={new_tokens}"]
    cmd = [str(python), str(script), "--worker", "trl" if side == "trl" else "ours", "--model", str(model),
           "--data", str(data), "--steps", str(steps), *tokens] + [f"--set={o}" for o in overrides if side == "ours"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=before or ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(runs: list[dict], skip: int) -> dict:
    steps = [t for r in runs for t in r["step_s"][skip:]]
    tokens = [t for r in runs for t in r["tokens"][skip:]]
    median = statistics.median(steps)
    return {"s_step": median, "samples_s": PROMPTS * N / median,
            "tokens_s": statistics.median(tokens) / median if tokens else float("nan"),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "steps": len(steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--steps", type=int, default=12, help="GRPO steps per run (default 12)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps of each run left out (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, alternating with --vs-trl")
    p.add_argument("--vs-trl", action="store_true", help="also run TRL's GRPOTrainer and print the ratio")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help="config override for our side, e.g. --set trainer.encode_prompts_once=false")
    p.add_argument("--before", metavar="REV", help="also run this package as of git revision REV")
    p.add_argument("--padding-free", action="store_true", help="time the padded and the packed training forward")
    p.add_argument("--max-len", type=int, default=128, help="longest completion of --padding-free (default 128)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)
    if args.padding_free:
        return padding_free(args.config, args.max_len, args.rounds)
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must be larger than --skip ({args.skip}).")

    sides = {"ours": Path(sys.executable)}
    new_tokens = CONFIGS[args.config]["new_tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        before = None
        if args.before:
            before = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)
            sides["before"] = Path(sys.executable)
        if args.vs_trl:
            sides["trl"] = ensure_trl_env()
        try:
            model, data = make_assets(args.config, Path(tmp), PROMPTS * args.steps)
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for r in range(args.rounds):
                for side, python in sides.items():  # A B C A B C ...
                    runs[side].append(launch(side, python, model, data, args.steps, args.set, new_tokens, before))
                    last = runs[side][-1]["step_s"][args.skip:]
                    print(f"round {r + 1}/{args.rounds} {side:>6}: median {statistics.median(last):.3f} s/step",
                          flush=True)
        finally:
            if before is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    results = {side: summarise(rs, args.skip) for side, rs in runs.items()}
    print(f"\nconfig={args.config}: {PROMPTS} prompts x {N} completions, <= {new_tokens} new tokens, "
          f"fp32, {THREADS} threads, {args.rounds} run(s) x {args.steps - args.skip} timed steps per side"
          + (f"; ours with {' '.join(args.set)}" if args.set else "")
          + (f"; before = revision {args.before}" if args.before else ""))
    print(f"{'':>6} {'s/step':>8} {'samples/s':>10} {'tokens/s':>9} {'peak RSS MiB':>13}")
    for side, s in results.items():
        print(f"{side:>6} {s['s_step']:8.3f} {s['samples_s']:10.1f} {s['tokens_s']:9.1f} {s['peak_rss_mib']:13.0f}")
    if "before" in results:
        print(f"ours / before: step time {results['ours']['s_step'] / results['before']['s_step']:.2f}x, "
              f"peak RSS {results['ours']['peak_rss_mib'] / results['before']['peak_rss_mib']:.2f}x")
    if "trl" in results:
        ratio = results["trl"]["s_step"] / results["ours"]["s_step"]
        print(f"step throughput ours / TRL = {ratio:.2f}x; peak RSS ours / TRL = "
              f"{results['ours']['peak_rss_mib'] / results['trl']['peak_rss_mib']:.2f}")


def padding_free(config: str, max_len: int, rounds: int) -> None:
    """Median time of one training forward + backward, padded vs packed, on completions of widely
    varying lengths; the tokens the decoder processes in each."""
    import torch

    from lightrft_mm.models.logprobs import forward_logprobs
    from lightrft_mm.models.parts import model_parts
    from lightrft_mm.models.tiny import build_tiny
    from lightrft_mm.processors import make_adapter
    from lightrft_mm.schema import Sample, resolve_media

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        _, data = make_assets(config, Path(tmp), PROMPTS)
        model, processor = build_tiny("qwen2_5_vl", seed=0, **{k: v for k, v in CONFIGS[config].items()
                                                               if k != "new_tokens"})
        adapter = make_adapter(model, processor)
        samples = [resolve_media(Sample.from_dict(json.loads(line)), data.parent)
                   for line in data.read_text().splitlines()]
        prompts = adapter.encode_prompts(samples).repeat(N, adapter.pad_token_id)
    g = torch.Generator().manual_seed(0)
    rows = PROMPTS * N
    ordinary = torch.tensor(sorted(set(range(3, 300)) - set(adapter.special_ids_to_suppress())))
    ids = ordinary[torch.randint(0, len(ordinary), (rows, max_len), generator=g)]
    lengths = torch.randint(1, max_len + 1, (rows,), generator=g)
    mask = (torch.arange(max_len)[None] < lengths[:, None]).long()
    seen = []
    model_parts(model).blocks[-1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[:2].numel()),
        with_kwargs=True)
    times = {False: [], True: []}
    tokens = {}
    for _ in range(rounds * 3):
        for packed in (False, True):
            seen.clear()
            start = time.perf_counter()
            logps, _ = forward_logprobs(model, prompts, ids, mask, packed=packed)
            (logps * mask).sum().backward()
            times[packed].append(time.perf_counter() - start)
            tokens[packed] = seen[0]
            model.zero_grad(set_to_none=True)
    padding = 1 - tokens[True] / tokens[False]
    print(f"padding-free, config={config}: {rows} rows, prompt {prompts.input_ids.shape[1]} tokens, completions "
          f"1..{max_len} tokens (mean {lengths.float().mean():.0f}), fp32, {THREADS} threads")
    for packed in (False, True):
        print(f"{'packed' if packed else 'padded':>7}: {statistics.median(times[packed]):.3f} s forward+backward, "
              f"{tokens[packed]} decoder tokens")
    print(f"padding fraction {padding:.0%}; packed / padded time "
          f"{statistics.median(times[True]) / statistics.median(times[False]):.2f}")


if __name__ == "__main__":
    main()

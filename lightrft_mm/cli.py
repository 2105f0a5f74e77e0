"""`lightrft-mm`: train | validate | demo | eval | plot | view | prepare | data inspect | rewards list |
rewards score | vllm-serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lightrft_mm.errors import ConfigError, LightRFTError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    from lightrft_mm.config import help_text
    from lightrft_mm.datasets.inspect_data import build_parser as inspect_parser
    from lightrft_mm.prepare import build_parser as prepare_parser

    parser = argparse.ArgumentParser(prog="lightrft-mm", description="Multimodal reinforcement fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _seeing_parsers(sub)
    keys = "config keys:\n" + help_text()
    fmt = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser("train", help="train with a config", epilog=keys, formatter_class=fmt)
    _config_args(train)
    train.add_argument("--dry-run", action="store_true", help="build everything but the weights (meta device), "
                       "read the data's manifests and print the plan: steps, tokens and a memory estimate per GPU")
    train.add_argument("--world-size", type=int, default=None, metavar="N", help="--dry-run: plan for N processes "
                       "(GPUs; default: torchrun's WORLD_SIZE, else 1)")
    train.add_argument("--gpu-memory", type=float, default=None, metavar="GiB", help="--dry-run: one GPU's memory "
                       "(default: torch.cuda's, else 80, labelled as assumed)")
    validate = sub.add_parser("validate", help="check configs; list every problem", epilog=keys,
                              formatter_class=fmt)
    validate.add_argument("items", nargs="+", metavar="CONFIG.yaml | section.key=value",
                          help="one or more configs, then overrides applied to each")
    validate.add_argument("--import-plugins", action="store_true",
                          help="import the reward plugins the configs name (file.py:fn, package.module:fn, entry "
                               "points), which runs their code, and check their args too; without it they are "
                               "only located and read")
    demo = sub.add_parser("demo", help="prepare the demo data, train, print the demo line")
    _config_args(demo)
    demo.add_argument("--task", default=None, help="synthetic task of the demo data (default: the recipe's "
                      "data.synthetic)")
    prepare_parser(sub.add_parser("prepare", help="write unified sample shards"))
    data = sub.add_parser("data", help="look at prepared data").add_subparsers(dest="data_command", required=True)
    inspect_parser(data.add_parser("inspect", help="stats and samples of a prepared folder; --sheet draws them"))
    from lightrft_mm.rewards.cli import build_parser as rewards_parser

    rewards_parser(sub.add_parser("rewards", help="registered rewards: list them, score completions with them"))
    from lightrft_mm.evaluation import build_parser as eval_parser

    eval_parser(sub.add_parser("eval", help="evaluate a checkpoint: greedy accuracy, rewards, per source, pass@k"))
    sub.add_parser("vllm-serve", add_help=False,
                   help="run a vLLM rollout engine for rollout.vllm.mode=server (in vLLM's environment; --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vllm-serve"]:  # runs in vLLM's environment: none of the trainer is imported
        from lightrft_mm.rollout.vllm_server import main as serve

        serve(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    # Under torchrun every line names its rank; ranks other than 0 log warnings and errors only.
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    where = f"rank {rank}: " if rank is not None else ""
    logging.basicConfig(level=logging.INFO if rank in (None, "0") else logging.WARNING,
                        format=f"%(levelname)s {where}%(name)s: %(message)s")
    try:
        return _run(args)
    except LightRFTError as e:
        print(f"error: {where}{e}", file=sys.stderr)
        return 1
    except Exception as e:
        if where and type(e).__module__.startswith("torch.distributed") or "gloo" in str(e).lower():
            print(f"error: {where}a collective with the other ranks failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}). Another rank has probably died or stalled "
                  "past strategy.timeout_s; torchrun's summary below names the first rank that failed.",
                  file=sys.stderr)
            return 1
        raise


def _run(args: argparse.Namespace) -> int:
    if args.command in ("plot", "view"):
        return _see(args)
    elif args.command == "validate":
        return _validate(args.items, args.import_plugins)
    elif args.command == "train" and args.dry_run:
        from lightrft_mm.trainer.plan import dry_run

        return dry_run(args.config, args.overrides, world_size=args.world_size, gpu_memory=args.gpu_memory)
    elif args.command == "train":
        if args.world_size is not None or args.gpu_memory is not None:
            raise ConfigError("--world-size and --gpu-memory only apply to --dry-run (a real run's world size is "
                              "torchrun's --nproc_per_node). Fix: add --dry-run, or drop them.")
        from lightrft_mm.config import load_config
        from lightrft_mm.trainer.loop import train

        cfg = load_config(args.config, args.overrides)
        _before_heavy_work(cfg)
        s = train(cfg)
        if os.environ.get("RANK", "0") == "0":
            print(f"trained: {s['trained']}")
            print(f"train: accuracy before={s['before']} after={s['after']} heldout={s['heldout']} "
                  f"time={s['seconds']}s checkpoint={s['checkpoint']}")
    elif args.command == "demo":
        from lightrft_mm.demo import run_demo

        s = run_demo(args.config, args.overrides, task=args.task)
        if os.environ.get("RANK", "0") == "0":
            print(f"trained: {s['trained']}")
            print(s["line"])
    elif args.command == "prepare":
        from lightrft_mm.prepare import run

        return run(args)
    elif args.command == "data":
        from lightrft_mm.datasets.inspect_data import run as inspect

        return inspect(args)
    elif args.command == "rewards":
        from lightrft_mm.rewards.cli import run as rewards

        return rewards(args)
    elif args.command == "eval":
        from lightrft_mm.evaluation import run as evaluate

        return evaluate(args)
    return 0


def _before_heavy_work(cfg) -> None:
    """What validate only notes is required now, before any data or model is loaded: a colocated
    vLLM engine's environment, and a Hub model (found in the cache or downloaded; progress on local rank 0)."""
    from lightrft_mm.models.hub import is_hub_id, resolve

    if cfg.rollout.engine == "vllm" and cfg.rollout.vllm.mode == "colocate":
        from lightrft_mm.rollout.vllm import vllm_python

        vllm_python(cfg.rollout.vllm.python)
    if is_hub_id(cfg.model.name_or_path):
        resolve(cfg.model.name_or_path, cfg.model.revision or None,
                progress=os.environ.get("LOCAL_RANK", "0") == "0")


def _validate(items: list[str], import_plugins: bool) -> int:
    """Checks each config; reward plugins are only located and read unless `import_plugins`. A Hub model
    not downloaded yet and data folders the recipe's launch command prepares are notes, not errors."""
    from lightrft_mm.config import load_config
    from lightrft_mm.config.presence import presence_notes
    from lightrft_mm.rewards.scoring import plugin_check

    overrides = [x for x in items if "=" in x]
    failed = 0
    for path in [x for x in items if "=" not in x]:
        with plugin_check(import_plugins) as check:
            try:
                notes = presence_notes(load_config(path, overrides), path)
                error = None
            except LightRFTError as e:
                error = e
        how = ""
        if check.names and import_plugins:
            how = f"reward plugins imported and checked: {', '.join(check.names)}"
        elif check.names:
            how = (f"reward plugins checked without importing them: {', '.join(check.names)}; "
                   "--import-plugins to import them and check their args too")
        if error is None:
            print(f"{path}: ok" + (f" ({how})" if how else "") + "".join(f"\n  {note}" for note in notes))
        else:
            print(f"error: {error}" + (f"\n({how})" if how else ""), file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _seeing_parsers(sub) -> None:
    plot = sub.add_parser("plot", help="PNG curves of one or more runs (overlaid to compare them)")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their metrics.jsonl)")
    plot.add_argument("--out", default=None, help="the PNG (default: RUN/plot.png for one run, ./plot.png for "
                      "several)")
    plot.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                      help="metrics to draw, one panel each; patterns such as 'reward/*' allowed (default: reward "
                           "mean and per reward function, eval/accuracy, loss/kl, entropy, completion/length, "
                           "completion/truncated, time/step)")
    view = sub.add_parser("view", help="a static HTML page of a run's trajectories (logging.trajectories_every)")
    view.add_argument("run", metavar="RUN", help="the run folder")
    view.add_argument("--out", default=None, help="the view folder (default: RUN/view)")
    view.add_argument("--last", type=int, default=None, metavar="K", help="only the last K saved steps")


def _see(args: argparse.Namespace) -> int:
    """`plot` and `view`: a missing or malformed metrics file is an error line, not a traceback."""
    from pathlib import Path

    if args.command == "view":
        from lightrft_mm.view import build_view

        index = build_view(Path(args.run), Path(args.out) if args.out else None, last=args.last)
        print(f"view: {index} (open it in a browser: file://{index.resolve()})")
        return 0
    from lightrft_mm.trainer.plot import plot_runs

    out = Path(args.out) if args.out else Path(args.runs[0]) / "plot.png" if len(args.runs) == 1 else Path("plot.png")
    if len(args.runs) == 1 and not args.out and not Path(args.runs[0]).is_dir():
        out = Path(args.runs[0]).parent / "plot.png"
    try:
        panels = plot_runs([Path(r) for r in args.runs], out, keys=args.keys)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"plot: {out} ({len(panels)} panels: {', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

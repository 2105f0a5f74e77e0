"""`lightrft-mm rewards list | score`: see which rewards exist, and try them on completions.

`rewards score --data completions.jsonl` reads one JSON object per line: a Sample row (the
unified schema: id, source, messages, answer, choices, meta; media paths relative to the file's
folder) plus

- `completion` (string, required): the text to score;
- `completion_ids` (list of ints, optional): its token ids (rewards such as `overlong` need them);
- `group` (int, optional): completions of one prompt share a group (default: rows with the same
  `id`), used by `scoring.combine: normalize_then_sum`.

The table has a row per completion: each reward's score (sub-scores as `<reward>.<sub>`), `-`
for None (not applicable), `skip` where the reward's `sources` leave that row out, `error` or
`timeout`, and the combined total (`invalid` where every reward said None); then a summary per
reward (mean, std, none_rate, errors, timeouts, seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightrft_mm.errors import ConfigError, DataError

_FORMAT = __doc__.split("\n\n", 1)[1]


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `list` and `score` to the `rewards` sub-command's parser."""
    sub = parser.add_subparsers(dest="rewards_command", required=True, metavar="{list,score}")
    listing = sub.add_parser("list", help="every registered reward with its origin (module, entry point, file)")
    listing.add_argument("--plugin", action="append", default=[], metavar="FILE.py | package.module",
                         help="import this first, so the rewards it registers are listed too (repeatable)")
    listing.add_argument("-v", "--verbose", action="store_true",
                         help="also show how each is called (batched, per-sample, or factory) and a "
                              "factory's args")
    scoring = sub.add_parser("score", help="score completions offline and print a table",
                             description=_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    scoring.add_argument("--reward", action="append", default=[], metavar="NAME",
                         help="a reward to apply, weight 1 (repeatable): a registered name, package.module:fn "
                              "or path/file.py:fn")
    scoring.add_argument("--config", metavar="CONFIG.yaml",
                         help="apply the rewards: and scoring: sections of this config (weights, sources, args)")
    scoring.add_argument("--data", required=True, metavar="completions.jsonl", help="the completions (see above)")
    scoring.add_argument("--plugin", action="append", default=[], metavar="FILE.py | package.module",
                         help="import this first (its @register_reward names become usable)")
    scoring.add_argument("--width", type=int, default=40, help="characters of each completion shown (default 40)")
    return parser


def run(args: argparse.Namespace) -> int:
    from lightrft_mm.rewards import REWARDS

    for plugin in args.plugin:
        REWARDS.import_plugin(plugin)
    if args.rewards_command == "list":
        for name, origin in REWARDS.items():
            if args.verbose:
                kind, arguments = _describe(name)
                print(f"{name:24s} {kind:11s} {origin}" + (f"  args: {arguments}" if arguments else ""))
            else:
                print(f"{name:24s} {origin}")
        return 0
    return _score(args)


def _describe(name: str) -> tuple[str, str]:
    """(how the reward is called, a factory's arguments)."""
    import inspect

    from lightrft_mm.rewards import REWARDS, options_of

    try:
        obj = REWARDS.get(name)
    except Exception as exc:  # noqa: BLE001 - a broken plugin is shown, not fatal to the listing
        return "broken", f"fails to load: {exc}".splitlines()[0]
    options = options_of(obj)
    if not options.factory:
        return ("batched" if options.batched else "per-sample"), ""
    params = inspect.signature(obj).parameters.values()
    return "factory", ", ".join(p.name + ("" if p.default is p.empty else f"={p.default!r}") for p in params
                                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def read_completions(path: str | Path) -> list:
    """The RewardInputs of a completions.jsonl file (see the module docstring).

    Raises:
        DataError: naming the file and line of a row that is not JSON, lacks `completion`, or
            breaks the sample schema.
    """
    from lightrft_mm.rewards import RewardInput
    from lightrft_mm.schema import Sample, resolve_media

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file. Fix: a completions.jsonl (lightrft-mm rewards score --help).")
    inputs, groups = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
            raise DataError(f"{where}: needs a string field `completion` (the text to score) next to the sample's "
                            "fields.")
        row = dict(row)
        completion, ids, group = row.pop("completion"), row.pop("completion_ids", []), row.pop("group", None)
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise DataError(f"{where}: `completion_ids` must be a list of token ids (ints), got {ids!r}.")
        if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
            raise DataError(f"{where}: `group` must be an int, got {group!r}.")
        sample = resolve_media(Sample.from_dict(row, where=where), path.parent)
        if group is None:
            group = groups.setdefault(sample.id, len(groups))
        inputs.append(RewardInput(completion, tuple(ids), sample, group))
    if not inputs:
        raise DataError(f"{path}: no completions in it.")
    return inputs


def _reward_set(args: argparse.Namespace):
    from lightrft_mm.config import RewardSpec, ScoringConfig, build_config, read_yaml
    from lightrft_mm.rewards import build_reward_set

    specs, scoring = [], ScoringConfig()
    if args.config:
        raw = read_yaml(args.config)
        cfg = build_config({k: raw[k] for k in ("rewards", "scoring") if k in raw}, source=args.config)
        specs, scoring = list(cfg.rewards), cfg.scoring
    specs += [RewardSpec(name=name) for name in args.reward]
    if not specs:
        raise ConfigError("rewards score: no reward to apply. Fix: --reward NAME (repeatable) or --config CONFIG.yaml "
                          "with a rewards: list; lightrft-mm rewards list shows the names.")
    return build_reward_set(specs, scoring)


def _score(args: argparse.Namespace) -> int:
    from lightrft_mm.rewards import score
    from lightrft_mm.rewards.scoring import combined_totals, reward_metrics

    reward_set = _reward_set(args)
    inputs = read_completions(args.data)
    scores = score(reward_set, inputs)
    totals = combined_totals(reward_set, scores, [x.group for x in inputs])
    columns = [(name, None) for name in reward_set.names()]
    columns += [(name, sub) for name, o in scores.outcomes.items() for sub in o.subs]
    header = ["id", "source", "completion"] + [f"{n}.{s}" if s else n for n, s in columns] + ["total"]
    rows = []
    for i, x in enumerate(inputs):
        cells = [x.sample.id, x.sample.source, _clip(x.completion, args.width)]
        for name, sub in columns:
            outcome = scores.outcomes[name]
            status = outcome.status[i]
            value = outcome.subs[sub][i] if sub else outcome.values[i]
            cells.append(status if status in ("error", "timeout", "skip") and not sub else _num(value))
        cells.append(_num(totals[i]) if scores.valid[i] else "invalid")
        rows.append(cells)
    _print_table(header, rows, numeric_from=3)
    metrics = reward_metrics(reward_set, scores)
    stats = ["mean", "std", "none_rate", "errors", "timeouts", "time"]
    summary = [[name] + [_num(metrics.get(f"reward/{name}" if s == "mean" else f"reward/{name}/{s}")) for s in stats]
               for name in reward_set.names()]
    print()
    _print_table(["reward"] + stats, summary, numeric_from=1)
    print(f"\n{len(inputs)} completion(s), {metrics['reward/invalid']} invalid (every reward None), combine: "
          f"{reward_set.combine}")
    return 0


def _clip(text: str, width: int) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= width else flat[:max(width - 3, 0)] + "..."


def _num(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _print_table(header: list[str], rows: list[list[str]], numeric_from: int) -> None:
    widths = [max(len(str(r[c])) for r in [header] + rows) for c in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).rjust(w) if c >= numeric_from else str(cell).ljust(w)
                        for c, (cell, w) in enumerate(zip(row, widths))).rstrip())

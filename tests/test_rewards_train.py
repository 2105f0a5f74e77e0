"""A two-step training run with two rewards routed by source (tiny Qwen2.5-VL, CPU)."""

from __future__ import annotations

import json
import logging
import shutil
import textwrap

import pytest

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.trainer.loop import train


def _retag(src, dst, source):
    """A copy of a shard folder whose samples have another `source`."""
    shutil.copytree(src, dst)
    for shard in dst.glob("shard-*.jsonl"):
        rows = [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
        shard.write_text("".join(json.dumps(dict(r, source=source)) + "\n" for r in rows))
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    colors = prepare_synthetic("colors", root / "colors", n=8, seed=1)
    _retag(colors, root / "shapes", "shapes")
    _retag(colors, root / "misc", "misc")
    (root / "seen.py").write_text(textwrap.dedent(f"""
        def length(inputs):
            with open({str(root / 'seen.txt')!r}, "a") as f:
                f.writelines(x.sample.source + "\\n" for x in inputs)
            return [len(x.completion) / 10 for x in inputs]
    """))
    return root


def _cfg(data, out, *extra):
    return load_config("recipes/demo/colors.yaml", [
        f"data.train=[{data / 'colors'}, {data / 'shapes'}, {data / 'misc'}]", "data.eval=[]",
        f"trainer.output_dir={out}", "trainer.max_steps=2", "data.batch_size=6", "rollout.n=2",
        "rollout.max_new_tokens=4", "warmup.steps=0", "logging.progress=false", "logging.plot=false",
        f"rewards=[{{name: exact_match, sources: ['synthetic:colors']}}, "
        f"{{name: '{data / 'seen.py'}:length', sources: [shapes], weight: 0.5}}]", *extra])


def test_two_rewards_routed_by_source(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train(_cfg(data, tmp_path / "run"))
    assert "no reward applies to samples of source(s) misc" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    seen = (data / "seen.txt").read_text().split()
    assert seen and set(seen) == {"shapes"}  # the file reward only ever saw its own data
    for r in steps:
        # Every completion went to its source's reward, or (misc) to none: invalid, left out of the loss.
        assert r["reward/exact_match/routed"] + r["reward/length/routed"] + r["reward/invalid"] == 12
        assert r["reward/errors"] == 0 and r["reward/timeouts"] == 0
        assert {"reward/exact_match/time", "reward/length/none_rate"} <= set(r)
    assert sum(r["reward/length/routed"] for r in steps) == len(seen)
    assert sum(r["reward/exact_match/routed"] for r in steps) > 0 and sum(r["reward/invalid"] for r in steps) > 0


def test_a_source_no_sample_has_stops_the_run(data, tmp_path):
    with pytest.raises(ConfigError, match=r"rewards\[1\]\.sources: 'shapez'.*Did you mean 'shapes'"):
        train(_cfg(data, tmp_path / "run", f"rewards=[exact_match, {{name: '{data / 'seen.py'}:length', "
                                           "sources: [shapez]}]"))

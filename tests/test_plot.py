"""plot_curves: metrics.jsonl to PNG."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from lightrft_mm.trainer.plot import plot_curves, read_series


def _write_metrics(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def test_plot_writes_png_with_present_keys(tmp_path):
    metrics = _write_metrics(
        tmp_path / "metrics.jsonl",
        [
            {"step": 1, "reward/mean": 0.1, "loss": 0.5},
            {"step": 2, "reward/mean": 0.3},
            {"step": 2, "eval/accuracy": 0.4},
            {"step": 3, "reward/mean": 0.6, "eval/accuracy": None},
        ],
    )
    out = plot_curves(metrics, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert out.stat().st_size > 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        two_panels = image.size
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left

    one = plot_curves(metrics, tmp_path / "one.png", keys=("reward/mean", "missing"))
    with Image.open(one) as image:
        assert image.size[1] < two_panels[1]  # one subplot, shorter figure


def test_plot_overwrites_existing_file(tmp_path):
    metrics = _write_metrics(tmp_path / "metrics.jsonl", [{"step": 0, "reward/mean": 1.0}])
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    plot_curves(metrics, out)
    with Image.open(out) as image:
        assert image.format == "PNG"


def test_plot_raises_when_no_key_appears(tmp_path):
    metrics = _write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.5}])
    out = tmp_path / "curves.png"
    with pytest.raises(ValueError, match="none of the keys"):
        plot_curves(metrics, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [metrics]


def test_read_series_sorts_dedupes_and_skips_truncated_tail(tmp_path):
    metrics = _write_metrics(
        tmp_path / "metrics.jsonl",
        [{"step": 3, "a": 3.0}, {"step": 1, "a": 1.0}, {"step": 3, "a": 30.0}, {"step": 4, "a": True}],
        tail='{"step": 5, "a": ',
    )
    assert read_series(metrics, ["a", "b"]) == {"a": [(1.0, 1.0), (3.0, 30.0)]}


def test_read_series_rejects_malformed_lines(tmp_path):
    bad_json = _write_metrics(tmp_path / "bad.jsonl", [], tail='{"step": 1\n{"step": 2, "a": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        read_series(bad_json, ["a"])
    no_step = _write_metrics(tmp_path / "nostep.jsonl", [{"a": 1.0}, {"step": 2, "a": 2.0}])
    with pytest.raises(ValueError, match=r"nostep.jsonl:1: .*'step'"):
        read_series(no_step, ["a"])


def test_import_does_not_load_matplotlib():
    code = "import sys, lightrft_mm.trainer.plot; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

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


def _run(folder, records):
    folder.mkdir(parents=True)
    _write_metrics(folder / "metrics.jsonl", records)
    return folder


def _training_lines(scale, entropy=False):
    rows = [{"step": 0, "eval/accuracy": 0.1 * scale, "params/llm/trainable": 5}]
    for step in range(1, 5):
        row = {"step": step, "reward/mean": 0.2 * step * scale, "reward/std": 0.1, "reward/errors": 0,
               "reward/exact_match": 0.1 * step * scale, "reward/exact_match/std": 0.0,
               "reward/boxed_format": 0.5, "reward/boxed_format/none_rate": 0.0, "loss/kl": 0.01 * step,
               "completion/length": 7.0 + step, "completion/truncated": 0.5, "time/step": 0.3}
        if entropy:
            row["loss/entropy"] = 2.0 / step
        rows.append(row)
    rows.append({"step": 4, "final": True, "eval/accuracy": 0.4 * scale})
    return rows


def test_plot_runs_overlays_runs_with_the_default_panels(tmp_path):
    from lightrft_mm.trainer.plot import plot_runs, run_labels

    a = _run(tmp_path / "runs" / "a", _training_lines(1.0))
    b = _run(tmp_path / "runs" / "b", _training_lines(2.0, entropy=True))
    panels = plot_runs([a, b / "metrics.jsonl"], tmp_path / "out" / "compare.png")
    assert panels == ["reward/mean", "reward/exact_match", "reward/boxed_format", "eval/accuracy", "loss/kl",
                      "loss/entropy", "completion/length", "completion/truncated", "time/step"]
    with Image.open(tmp_path / "out" / "compare.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000  # two columns of panels
    assert run_labels([a, b / "metrics.jsonl"]) == ["a", "b"]
    assert read_series(b / "metrics.jsonl", ["eval/accuracy"]) == {"eval/accuracy": [(0.0, 0.2), (4.0, 0.8)]}

    # a panel with no data in any run is left out; patterns expand against the runs' keys
    assert plot_runs([a], tmp_path / "one.png") == [p for p in panels if p != "loss/entropy"]
    assert plot_runs([a, b], tmp_path / "r.png", keys=["reward/*_match", "loss/entropy"]) == [
        "reward/exact_match", "loss/entropy"]


def test_plot_runs_errors_name_the_problem(tmp_path):
    from lightrft_mm.trainer.plot import plot_runs

    a = _run(tmp_path / "a", _training_lines(1.0))
    with pytest.raises(ValueError, match="keys these runs logged: eval/accuracy"):
        plot_runs([a], tmp_path / "x.png", keys=["nope"])
    with pytest.raises(FileNotFoundError, match="no such metrics file"):
        plot_runs([a, tmp_path / "missing"], tmp_path / "x.png")
    assert run_labels_collide(tmp_path) == [str(tmp_path / "p" / "run"), str(tmp_path / "q" / "run")]


def run_labels_collide(tmp_path):
    from lightrft_mm.trainer.plot import run_labels

    runs = [_run(tmp_path / "p" / "run", []), _run(tmp_path / "q" / "run", [])]
    return run_labels(runs)


def test_plot_cli_writes_png(tmp_path, capsys):
    from lightrft_mm.cli import main

    a = _run(tmp_path / "a", _training_lines(1.0))
    b = _run(tmp_path / "b", _training_lines(2.0))
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "c.png"), "--keys", "reward/mean"]) == 0
    assert "c.png" in capsys.readouterr().out and (tmp_path / "c.png").stat().st_size > 0
    assert main(["plot", str(a)]) == 0
    assert (a / "plot.png").stat().st_size > 0
    assert main(["plot", str(tmp_path / "none")]) == 1
    assert "no such metrics file" in capsys.readouterr().err

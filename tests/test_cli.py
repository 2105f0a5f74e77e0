"""Tests of the `lightrft-mm` command line: validate, rewards list, prepare and train --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightrft_mm.cli import main
from lightrft_mm.schema import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/demo/colors.yaml"


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, as the documented commands do."""
    monkeypatch.chdir(ROOT)


def test_validate_recipe_is_ok(in_repo, capsys):
    assert main(["validate", RECIPE]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{RECIPE}: ok"
    assert "error" not in err


def test_validate_applies_overrides(in_repo, capsys):
    assert main(["validate", RECIPE, "rollout.n=1"]) == 1
    out, err = capsys.readouterr()
    assert "ok" not in out
    assert "rollout.n: 1 is below the minimum 2" in err


def test_validate_lists_every_mistake(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  n: eight\ntrainer:\n  max_stpes: 5\n"
                    "rewards:\n  - {name: exact_mach, weight: 1.0}\n")
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and str(path) in err and "3 problem" in err
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 3, err
    assert any(l.startswith("- rollout.n:") and "not an integer" in l for l in lines)
    assert any(l.startswith("- trainer.max_stpes:") and "did you mean 'max_steps'" in l for l in lines)
    assert any(l.startswith("- rewards[0].name:") and "Did you mean 'exact_match'" in l for l in lines)
    assert "Traceback" not in err


def test_validate_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err


def test_rewards_list_shows_names_and_origins(capsys):
    assert main(["rewards", "list"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        name, origin = line.split()
        rows[name] = origin
    assert rows["exact_match"] == "lightrft_mm.rewards.rules:exact_match"
    assert rows["boxed_format"] == "lightrft_mm.rewards.rules:boxed_format"


def _check_shard(out: Path, n: int, seed: int) -> list:
    assert (out / "shard-00000.jsonl").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["source"], manifest["count"], manifest["options"]) == ("synthetic:colors", n, {"n": n, "seed": seed})
    samples = list(read_jsonl(out / "shard-00000.jsonl"))
    assert len(samples) == n
    for s in samples:
        (image,) = s.media("image")
        assert (out / image.image).is_file()
    return samples


def test_prepare_writes_a_shard(tmp_path, capsys):
    out = tmp_path / "colors"
    assert main(["prepare", "synthetic:colors", "--out", str(out), "--n", "8", "--seed", "1"]) == 0
    assert f"wrote 8 samples to {out}" in capsys.readouterr().out
    samples = _check_shard(out, 8, 1)
    assert {s.id for s in samples} == {f"colors-1-{i}" for i in range(8)}


def test_prepare_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "colors"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prepare", "synthetic:colors", "--out", str(out), "--n", "4"]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_prepare_unknown_source(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["prepare", "hub:colors", "--out", str(out)]) == 1
    assert "synthetic:colors" in capsys.readouterr().err
    assert not out.exists()


def test_prepare_module_entry_point(tmp_path):
    out = tmp_path / "colors"
    proc = subprocess.run(
        [sys.executable, "-m", "lightrft_mm.prepare", "synthetic:colors", "--out", str(out),
         "--n", "4", "--seed", "3"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 4 samples to {out}" in proc.stdout
    _check_shard(out, 4, 3)
    # A second run into the same folder is refused with exit status 1 and a readable error.
    again = subprocess.run(
        [sys.executable, "-m", "lightrft_mm.prepare", "synthetic:colors", "--out", str(out), "--n", "4"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and "Traceback" not in again.stderr


def test_prepare_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("mine")
    assert main(["prepare", "synthetic:colors", "--out", str(out), "--n", "4"]) == 1
    assert str(out) in capsys.readouterr().err
    assert out.read_text() == "mine"


@pytest.mark.parametrize("command", ["train", "validate"])
def test_help_lists_config_keys(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("rollout.temperature", "trainer.max_steps", "model.name_or_path", "rewards.weight",
                "warmup.template"):
        assert key in out
    assert "section.key=value" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: lightrft-mm" in capsys.readouterr().err


# --- validate runs no plugin code unless --import-plugins ---------------------------------------

def _marking_plugin(path: Path, marker: Path) -> Path:
    """A reward plugin whose module code leaves `marker` behind when it runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n\n"
                    "def fn(inputs):\n    return [1.0] * len(inputs)\n")
    return path


def test_validate_reads_a_file_plugin_without_running_it(tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    plugin = _marking_plugin(tmp_path / "plug.py", marker)
    good, wrong = tmp_path / "good.yaml", tmp_path / "wrong.yaml"
    good.write_text(f"rewards: [{{name: '{plugin}:fn', args: {{unchecked: 1}}}}]\n")
    wrong.write_text(f"rewards: [{{name: '{plugin}:fm'}}]\n")
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert not marker.exists()
    assert out.startswith(f"{good}: ok (reward plugins checked without importing them: {plugin}:fn;")
    assert "--import-plugins" in out
    assert main(["validate", str(wrong)]) == 1
    err = capsys.readouterr().err
    assert "rewards[0].name" in err and str(plugin) in err and "'fm'" in err
    assert "it defines: Path, fn" in err
    assert "Fix: name one of them" in err and not marker.exists()
    assert main(["validate", "--import-plugins", str(good)]) == 1  # imported: its args are checked too
    assert marker.read_text() == "ran" and "takes no args (got ['unchecked'])" in capsys.readouterr().err
    marker.unlink()
    good.write_text(f"rewards: [{{name: '{plugin}:fn'}}]\n")
    assert main(["validate", "--import-plugins", str(good)]) == 0
    assert f"reward plugins imported and checked: {plugin}:fn" in capsys.readouterr().out


def test_validate_locates_modules_and_entry_points_without_importing(
        tmp_path, monkeypatch, capsys, installed_reward_plugin):
    marker = tmp_path / "ran.txt"
    _marking_plugin(tmp_path / "lrmm_vpkg" / "__init__.py", marker)
    _marking_plugin(tmp_path / "lrmm_vpkg" / "sub.py", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"rewards: [{{name: 'lrmm_vpkg.sub:fn'}}, {installed_reward_plugin}]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: [{name: 'lrmm_vpkg.nope:fn'}, {name: 'lrmm_vpkg.sub:nope'}]\n")
    try:
        assert main(["validate", str(cfg)]) == 0
        assert "checked without importing them: lrmm_vpkg.sub:fn, politeness;" in capsys.readouterr().out
        assert main(["validate", str(bad)]) == 1
        err = capsys.readouterr().err
        assert "no module named 'lrmm_vpkg.nope'" in err and "'nope'; it defines: Path, fn" in err
        assert not marker.exists() and "lrmm_vpkg" not in sys.modules and "lrmm_plugin_mod" not in sys.modules
        assert main(["validate", "--import-plugins", str(cfg)]) == 0
        assert marker.exists() and "lrmm_vpkg.sub" in sys.modules and "lrmm_plugin_mod" in sys.modules
    finally:
        for name in ("lrmm_vpkg", "lrmm_vpkg.sub"):
            sys.modules.pop(name, None)


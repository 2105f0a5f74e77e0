"""`lightrft-mm rewards list` (names, kinds, origins: module, entry point, file) and
`lightrft-mm rewards score` (a table of scores for a completions.jsonl)."""

from __future__ import annotations

import json
import textwrap

import pytest

from lightrft_mm.cli import main

GEO = {"source": "geo3k", "answer": "48", "choices": ["24", "36", "48", "60"],
       "messages": [{"role": "user", "content": [{"type": "image", "image": "media/p.png"},
                                                 {"type": "text", "text": "Find x. \\boxed{48}"}]}]}


def _rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


def test_list_shows_origins(capsys, installed_reward_plugin, tmp_path):
    plugin = tmp_path / "team_rewards.py"
    plugin.write_text(textwrap.dedent("""
        from lightrft_mm.rewards import register_reward

        @register_reward("team_brevity", batched=False)
        def brevity(x):
            return -len(x.completion) / 100
    """))
    try:
        assert main(["rewards", "list", "--plugin", str(plugin)]) == 0
        rows = _rows(capsys.readouterr().out)
        assert rows["math_accuracy"] == ["lightrft_mm.rewards.answers:math_accuracy"]
        assert rows["scalar_rm"] == ["lightrft_mm.rewards.models:scalar_rm"]  # lazy: not imported to list it
        assert rows["politeness"] == ["entry", "point", "lrmm_plugin_pkg", "lrmm_plugin_mod:politeness"]
        assert rows["team_brevity"] == [f"{plugin}:brevity"]
        assert main(["rewards", "list", "-v"]) == 0
        rows = _rows(capsys.readouterr().out)
        assert rows["exact_match"][0] == "batched" and rows["think_format"][0] == "per-sample"
        assert rows["remote_rm"][0] == "factory" and rows["politeness"][0] == "batched"
        assert rows["overlong"][-3:] == ["args:", "max_length,", "buffer=None"]
    finally:
        from lightrft_mm.rewards import REWARDS

        REWARDS._origins.pop("team_brevity", None)
        REWARDS._objects.pop("team_brevity", None)


def test_list_plugin_module(capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "lrmm_team_mod.py").write_text(
        "from lightrft_mm.rewards import register_reward\n\n"
        "@register_reward('team_kindness')\ndef kindness(inputs):\n    return [0.0] * len(inputs)\n")
    try:
        assert main(["rewards", "list", "--plugin", "lrmm_team_mod"]) == 0
        assert _rows(capsys.readouterr().out)["team_kindness"] == ["lrmm_team_mod:kindness"]
    finally:
        from lightrft_mm.rewards import REWARDS

        REWARDS._origins.pop("team_kindness", None)
        REWARDS._objects.pop("team_kindness", None)
        sys.modules.pop("lrmm_team_mod", None)
    assert main(["rewards", "list", "--plugin", "lrmm_no_such_mod"]) == 1
    assert "lrmm_no_such_mod" in capsys.readouterr().err


def test_list_plugin_errors(capsys, tmp_path):
    assert main(["rewards", "list", "--plugin", str(tmp_path / "missing.py")]) == 1
    assert "missing.py" in capsys.readouterr().err


@pytest.fixture
def completions(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "p.png").write_bytes(b"png")
    rows = [dict(GEO, id="p1", completion="<think>sum of angles</think> \\boxed{48}"),
            dict(GEO, id="p1", completion="\\boxed{C}"),
            dict(GEO, id="p1", completion="\\boxed{36}\nno"),
            {"id": "c1", "source": "colors", "answer": "red", "messages": [{"role": "user", "content": "Colour?"}],
             "completion": "red", "completion_ids": [1, 2, 3]}]
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_prints_a_table(capsys, completions):
    assert main(["rewards", "score", "--reward", "math_accuracy", "--reward", "think_format", "--reward", "geo3k",
                 "--data", str(completions)]) == 0
    out = capsys.readouterr().out
    table, summary, footer = out.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == ["id", "source", "completion", "math_accuracy", "think_format", "geo3k",
                                "geo3k.accuracy", "geo3k.format", "total"]
    assert lines[1].split()[-6:] == ["1.000", "1.000", "1.000", "1.000", "1.000", "3.000"]
    assert lines[2].split()[-6:] == ["1.000", "0.000", "0.900", "1.000", "0.000", "1.900"]  # the letter C is 48
    assert "\\boxed{36}\\nno" in lines[3]                  # newlines shown escaped
    assert lines[4].split()[-6:] == ["0.000"] * 6  # no box, no "answer is": no final answer
    assert summary.splitlines()[0].split() == ["reward", "mean", "std", "none_rate", "errors", "timeouts", "time"]
    assert _rows(summary)["geo3k"][:4] == ["0.475", "0.476", "0.000", "0"]
    assert footer == "4 completion(s), 0 invalid (every reward None), combine: sum_then_normalize"
    assert main(["rewards", "score", "--reward", "exact_match", "--width", "8", "--data", str(completions)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == "<thin..."


def test_score_with_a_config_and_a_file_plugin(capsys, completions, tmp_path):
    plugin = tmp_path / "checks.py"
    plugin.write_text(textwrap.dedent("""
        from pathlib import Path

        def media_ok(inputs):
            return [float(all(Path(p.path).is_file() for p in x.sample.media())) for x in inputs]

        def picky(inputs):
            if any(x.completion == "red" for x in inputs):
                raise ValueError("no colours please")
            return [1.0] * len(inputs)
    """))
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{name_or_path: /not/checked/here}}
        rewards:
          - {{name: exact_match, weight: 2.0, sources: [colors]}}
          - {{name: overlong, args: {{max_length: 4, buffer: 2}}, label: long}}
          - {{name: '{plugin}:media_ok', sources: [geo3k]}}
        scoring: {{combine: normalize_then_sum}}
    """))
    assert main(["rewards", "score", "--config", str(config), "--reward", f"{plugin}:picky",
                 "--data", str(completions)]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[3:] == ["exact_match", "long", "media_ok", "picky", "total"]
    assert table[1].split()[-5:-1] == ["skip", "-", "1.000", "error"]  # media paths resolved from the file's folder
    assert table[4].split()[-5:-1] == ["1.000", "-0.500", "skip", "error"]  # 3 token ids: in the ramp
    assert "combine: normalize_then_sum" in out


def test_score_errors(capsys, tmp_path, completions):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(GEO, id="x")) + "\n")
    assert main(["rewards", "score", "--reward", "exact_match", "--data", str(bad)]) == 1
    assert f"{bad} line 1" in capsys.readouterr().err
    assert main(["rewards", "score", "--data", str(completions)]) == 1
    assert "--reward NAME" in capsys.readouterr().err
    assert main(["rewards", "score", "--reward", "math_acuracy", "--data", str(completions)]) == 1
    assert "did you mean 'math_accuracy'" in capsys.readouterr().err
    cfg = tmp_path / "ff.yaml"
    cfg.write_text(f"rewards: [{{name: '{tmp_path}/boom.py:f'}}]\nscoring: {{fail_fast: true}}\n")
    (tmp_path / "boom.py").write_text("def f(inputs):\n    raise RuntimeError('kaput')\n")
    assert main(["rewards", "score", "--config", str(cfg), "--data", str(completions)]) == 1
    assert "kaput" in capsys.readouterr().err

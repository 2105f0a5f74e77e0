"""`lightrft-mm eval` and `trainer.evaluate`: the trainer's numbers from a checkpoint, rewards
that see what training shows them, pass@k, per-source breakdown, ranks, clear errors."""

import json
import math
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lightrft_mm.cli import main
from lightrft_mm.config import load_config
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.rollout.hf import Rollouts
from lightrft_mm.schema import Sample
from lightrft_mm.trainer.evaluate import evaluate, pass_at_k, sampled_metrics
from lightrft_mm.trainer.loop import train

SYSTEM = "Answer with the colour in a box."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step colour run with a system prompt: its folder, held-out data and a recording reward."""
    root = tmp_path_factory.mktemp("eval")
    prepare_synthetic("colors", root / "train", n=16, seed=1)
    prepare_synthetic("colors", root / "heldout", n=8, seed=2)
    (root / "record.py").write_text(textwrap.dedent("""
        import json, os

        def record(inputs):
            with open(os.environ["EVAL_RECORD"], "a") as f:
                for x in inputs:
                    f.write(json.dumps({"n": len(x.completion_ids), "text": x.completion,
                                        "roles": [m.role for m in x.messages],
                                        "system": [p.text for m in x.messages if m.role == "system"
                                                   for p in m.content]}) + "\\n")
            return [0.0 for _ in inputs]
    """))
    out = root / "run"
    summary = train(load_config("recipes/demo/colors.yaml", [
        f"data.train=[{root / 'train'}]", f"data.eval=[{root / 'heldout'}]", f"trainer.output_dir={out}",
        "trainer.max_steps=2", "data.batch_size=4", "rollout.n=2", "warmup.steps=0", "trainer.eval_every=0",
        "trainer.save_every=0", "trainer.keep_checkpoints=0", "logging.progress=false",
        f"data.system_prompt={SYSTEM}"]))
    return {"root": root, "out": out, "summary": summary, "heldout": root / "heldout"}


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_of_the_final_checkpoint_equals_the_runs_after_accuracy(run, capsys, tmp_path):
    out = tmp_path / "eval.json"
    code, stdout, _ = _eval(capsys, run["out"] / "checkpoint-final", "--data", run["heldout"], "--out", out)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["greedy"]["accuracy"] == run["summary"]["after"]
    assert f"accuracy: {run['summary']['after']!r}" in stdout
    assert result["greedy"]["n"] == 8 and result["system_prompt"] == SYSTEM
    assert result["rewards"] == ["exact_match", "boxed_format"]  # the run's rewards
    assert {"reward/exact_match", "reward/boxed_format", "reward"} <= set(result["greedy"])
    assert len(result["samples"]) == 8 and {"completion", "rewards", "tokens"} <= set(result["samples"][0])


class _Engine:
    """Rollouts of fixed completions: row i has `lengths[i]` real tokens, right-padded to 6."""

    def __init__(self, lengths):
        self.lengths = lengths

    def generate(self, prompts, n, sampling):
        rows = len(prompts) * n
        lengths = [self.lengths[i % len(self.lengths)] for i in range(rows)]
        mask = torch.tensor([[1] * k + [0] * (6 - k) for k in lengths])
        ids = torch.where(mask.bool(), torch.full_like(mask, 7), torch.zeros_like(mask))
        return Rollouts(None, ids, mask, torch.zeros(rows, 6), ["\\boxed{red}"] * rows, n)


class _Adapter:
    def encode_prompts(self, samples):
        return list(samples)


def _samples(k, sources=("colors",)):
    return [Sample.from_dict({"id": f"s{i}", "source": sources[i % len(sources)], "answer": "red",
                              "messages": [{"role": "user", "content": [{"type": "text", "text": "Colour?"}]}]})
            for i in range(k)]


def test_rewards_get_the_completions_real_tokens_not_the_batch_padding():
    seen = []

    def lengths(inputs):
        seen.extend(len(x.completion_ids) for x in inputs)
        return [0.0] * len(inputs)

    result = evaluate(_Engine([2, 5, 6]), _Adapter(), _samples(3), [("lengths", lengths, 1.0)],
                      accuracy_reward="lengths", max_new_tokens=6)
    assert seen == [2, 5, 6] and result["n"] == 3


def test_overlong_scores_short_greedy_completions_zero():
    from lightrft_mm.rewards import REWARDS

    overlong = REWARDS.get("overlong")(max_length=6, buffer=2)
    result = evaluate(_Engine([3]), _Adapter(), _samples(4), [("overlong", overlong, 1.0)],
                      accuracy_reward="overlong", max_new_tokens=6)
    assert result["accuracy"] == 0.0  # 3 real tokens of 6: no penalty (the padded width scored -1)


def test_rewards_see_the_system_prompt_in_eval_as_in_training():
    seen = []

    def system(inputs):
        seen.extend([p.text for m in x.messages if m.role == "system" for p in m.content] for x in inputs)
        return [1.0] * len(inputs)

    evaluate(_Engine([2]), _Adapter(), _samples(2), [("system", system, 1.0)], accuracy_reward="system",
             max_new_tokens=6, system_prompt=SYSTEM)
    assert seen == [[SYSTEM], [SYSTEM]]


def test_eval_command_gives_rewards_the_runs_system_prompt_and_real_lengths(run, capsys, tmp_path, monkeypatch):
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("EVAL_RECORD", str(record))
    code, _, err = _eval(capsys, run["out"] / "checkpoint-final", "--data", run["heldout"],
                         "--rewards", f"{run['root'] / 'record.py'}:record", "exact_match", "--max-new-tokens", "8")
    assert code == 0, err
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 8 and all(r["system"] == [SYSTEM] and r["roles"][0] == "system" for r in rows)
    assert all(1 <= r["n"] <= 8 for r in rows)
    # The prompt the model was given holds the system prompt too (the adapter's encoding).
    from lightrft_mm.models import load_pretrained
    from lightrft_mm.processors import make_adapter

    model, processor = load_pretrained(run["out"] / "checkpoint-final")
    adapter = make_adapter(model, processor, system_prompt=SYSTEM)
    ids = adapter.encode_prompts(_samples(1)).input_ids[0]
    assert SYSTEM in processor.tokenizer.decode(ids)


def test_pass_at_k_and_mean_at_k_known_values():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(3, 1, 3) == 1.0  # n - c < k
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    records = [{"completions": ["a"] * 4, "rewards": {"acc": [1.0, 0.0, 0.0, 0.0]}},
               {"completions": ["a"] * 4, "rewards": {"acc": [1.0, 1.0, 0.6, 0.2]}},
               {"completions": ["a"] * 4, "rewards": {"acc": [None] * 4}}]  # not applicable: not counted
    m = sampled_metrics(records, "acc", [1, 2, 4])
    assert m["n"] == 2
    assert m["pass@1"] == pytest.approx((0.25 + 0.75) / 2)  # 0.6 > 0.5 counts as correct
    assert m["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["pass@4"] == pytest.approx(1.0)
    assert m["mean@4"] == pytest.approx((0.25 + 0.7) / 2)  # the raw reward, not thresholded


def test_per_source_breakdown_and_sampled_pass_at_k(run, capsys, tmp_path):
    other = tmp_path / "tones"
    shutil.copytree(run["heldout"], other)
    for shard in other.glob("*.jsonl"):
        rows = [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
        shard.write_text("".join(json.dumps({**r, "source": "tints"}) + "\n" for r in rows[:4]))
    out = tmp_path / "eval.json"
    code, stdout, err = _eval(capsys, run["out"] / "checkpoint-final", "--data", run["heldout"], other,
                              "--n", "4", "--out", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert sorted(result["by_source"]) == ["synthetic:colors", "tints"]
    assert result["by_source"]["synthetic:colors"]["n"] == 8 and result["by_source"]["tints"]["n"] == 4
    assert result["greedy"]["n"] == 12
    # The same completions of the same images: tints' greedy scores are colours' first four.
    first4 = [s["rewards"]["exact_match"] for s in result["samples"][:4]]
    assert result["by_source"]["tints"]["accuracy"] == pytest.approx(sum(first4) / 4)
    sp = result["sampled"]
    assert {"pass@1", "pass@4", "mean@4"} <= set(sp) and sp["n"] == 12 and sp["per_prompt"] == 4
    assert 0 <= sp["pass@1"] <= sp["pass@4"] <= 1 and sp["pass@1"] == pytest.approx(sp["mean@4"])
    assert sorted(sp["by_source"]) == ["synthetic:colors", "tints"]
    assert "tints" in stdout and "pass@4" in stdout and "4 per prompt" in stdout


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_result(run, tmp_path):
    from tests.test_distributed import torchrun

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["eval", str(run["out"] / "checkpoint-final"), "--data", str(run["heldout"]), "--no-progress",
            "--batch-size", "3"]
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "lightrft_mm", *args, "--out", str(one)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = torchrun(["-m", "lightrft_mm", *args, "--out", str(two)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("accuracy:") == 1  # rank 0 reports, once
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["greedy"] == b["greedy"] and a["samples"] == b["samples"] and a["by_source"] == b["by_source"]
    assert time.time() - t < 60


def test_clear_errors(run, capsys, tmp_path):
    code, _, err = _eval(capsys, tmp_path / "nope", "--data", run["heldout"])
    assert code == 1 and "checkpoint" in err and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _eval(capsys, run["out"] / "checkpoint-final", "--data", empty)
    assert code == 1 and "holds no .jsonl shard" in err
    code, _, err = _eval(capsys, run["out"] / "checkpoint-final", "--data", run["heldout"],
                         "--rewards", "exact_macth", "--n", "0")
    assert code == 1 and "Did you mean 'exact_match'" in err and "--n: 0" in err
    code, _, err = _eval(capsys, run["out"] / "checkpoint-final", "--data", run["heldout"], "--k", "2")
    assert code == 1 and "--k" in err


def test_without_a_run_config_the_defaults_apply(run, capsys, tmp_path):
    bare = tmp_path / "model"
    shutil.copytree(run["out"] / "checkpoint-final", bare)
    out = tmp_path / "eval.json"
    code, _, err = _eval(capsys, bare, "--data", run["heldout"], "--out", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["run_config"] is None and result["rewards"] == ["exact_match"]
    assert result["system_prompt"] == "" and result["max_new_tokens"] == 64
    assert not math.isnan(result["greedy"]["accuracy"])


def test_a_recipe_gives_a_base_models_eval_its_prompt_rewards_and_sampling(run, capsys, tmp_path):
    """--config RECIPE: a model that was never trained here (the base model of a recipe) is scored
    with the recipe's rewards, answer checking and response length; --temperature / --top-p set
    the sampled pass, as a published evaluation's decoding does (EasyR1: 0.6 / 0.95)."""
    bare = tmp_path / "base"
    shutil.copytree(run["out"] / "checkpoint-final", bare)
    geo = prepare_synthetic("geo3k_like", tmp_path / "geo", n=4, seed=3)
    out = tmp_path / "eval.json"
    code, stdout, err = _eval(capsys, bare, "--data", geo, "--config", "recipes/geo3k/tiny.yaml", "--n", "2",
                              "--temperature", "0.6", "--top-p", "0.95", "--out", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["run_config"] == "recipes/geo3k/tiny.yaml"
    assert result["accuracy_reward"] == "math_accuracy" and "geo3k" in result["rewards"]
    assert result["max_new_tokens"] == load_config("recipes/geo3k/tiny.yaml").rollout.max_new_tokens
    assert (result["sampled"]["temperature"], result["sampled"]["top_p"]) == (0.6, 0.95)
    assert "accuracy: " in stdout and "mean of math_accuracy" in stdout
    code, _, err = _eval(capsys, bare, "--data", geo, "--config", tmp_path / "missing.yaml")
    assert code == 1 and "missing.yaml" in err
    code, _, err = _eval(capsys, bare, "--data", geo, "--n", "2", "--top-p", "1.5")
    assert code == 1 and "--top-p: 1.5" in err


def test_the_trainers_evaluation_gives_rewards_the_system_prompt(run, tmp_path, monkeypatch):
    """The run's own before / after evaluation (the loop's `run_eval`) passes data.system_prompt."""
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("EVAL_RECORD", str(record))
    train(load_config("recipes/demo/colors.yaml", [
        f"data.train=[{run['root'] / 'train'}]", f"data.eval=[{run['heldout']}]",
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=1", "data.batch_size=4", "rollout.n=2",
        "rollout.max_new_tokens=4", "warmup.steps=0", "logging.progress=false", "logging.plot=false",
        f"rewards=[{{name: '{run['root'] / 'record.py'}:record'}}]", f"data.system_prompt={SYSTEM}"]))
    rows = [json.loads(x) for x in record.read_text().splitlines()]
    assert rows and all(r["system"] == [SYSTEM] for r in rows)  # training rollouts and both evaluations

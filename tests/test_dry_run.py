"""`lightrft-mm train CONFIG --dry-run`: every recipe plans offline, the 7B plan on 8 GPUs names its
largest term without allocating the model, the estimate warns past --gpu-memory, and the exact
terms of a tiny model equal the real bytes after one optimizer step."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightrft_mm.cli import main
from lightrft_mm.config import load_config
from lightrft_mm.trainer.plan import make_plan

RECIPES = sorted(str(p) for p in Path(__file__).resolve().parents[1].glob("recipes/*/*.yaml"))
TERMS = ("parameters", "gradients", "master weights", "optimizer state", "KL reference model", "activations",
         "vision tower activations", "log-prob head", "total (peak:", "GPU capacity", "largest term:")
TINY = "recipes/geo3k/tiny.yaml"


def dry(capsys, *argv) -> tuple[int, str, str]:
    code = main(["train", *argv, "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: "/".join(Path(p).parts[-2:]))
def test_every_recipe_dry_runs_with_every_term(recipe, capsys):
    code, out, err = dry(capsys, recipe)
    assert code == 0, err
    for term in TERMS:
        assert term in out, f"{term!r} missing from the plan of {recipe}"
    assert "KV cache" in out or "vLLM engine" in out
    assert "world size" in out and "optimizer steps" in out and "tokens per step" in out


def test_7b_plan_on_8_gpus_names_largest_term_and_allocates_nothing():
    """In a fresh process (its peak resident memory is the plan's alone): the 7B recipe on 8 GPUs,
    the model on the meta device, the card's parameter count the published ~8.3B."""
    script = (
        "import json, resource, sys\n"
        "import lightrft_mm.trainer.plan as plan\n"
        "from lightrft_mm.cli import main\n"
        "built, meta, made, make = [], plan.meta_policy, [], plan.make_plan\n"
        "plan.meta_policy = lambda c: built.append(meta(c)) or built[-1]\n"
        "plan.make_plan = lambda *a, **k: made.append(make(*a, **k)) or made[-1]\n"
        "code = main(['train', 'recipes/geo3k/qwen2_5_vl_7b.yaml', '--dry-run', '--world-size', '8'])\n"
        "p = made[0]\n"
        "print('FACTS', json.dumps({'devices': sorted({x.device.type for x in built[0][0].parameters()}),\n"
        "      'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, 'params': p.shape.params,\n"
        "      'terms': [[t.name, t.bytes, t.phase] for t in p.terms], 'phase': p.phase, 'total': p.total}))\n"
        "sys.exit(code)\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out, facts = done.stdout.split("FACTS ")
    facts = json.loads(facts)
    cfg = load_config("recipes/geo3k/qwen2_5_vl_7b.yaml")
    assert "world size 8" in out and f"per rank and step: {cfg.data.batch_size // 8} prompts" in out
    assert abs(facts["params"] - 8.29e9) / 8.29e9 < 0.01, facts["params"]  # Qwen2.5-VL-7B: 8.29B published
    assert f"{facts['params']:,} parameters" in out
    phase = "train" if facts["phase"] == "training" else "rollout"
    counted = [(name, size) for name, size, where in facts["terms"] if where in ("both", phase)]
    assert abs(sum(size for _, size in counted) - facts["total"]) < 1
    largest = max(counted, key=lambda t: t[1])[0]
    assert f"largest term: {largest} (" in out
    sizes = {name: size for name, size, _ in facts["terms"]}
    if cfg.strategy.name == "fsdp2":
        assert sizes["parameters"] == 4 * facts["params"] / 8  # fp32 shards over 8 ranks
    assert facts["devices"] == ["meta"]
    assert facts["rss_mb"] < 3000, f"resident {facts['rss_mb']} MB: the 7B model (16.6 GB in bf16) was allocated"


def test_estimate_past_gpu_memory_warns(capsys):
    code, out, _ = dry(capsys, TINY, "--gpu-memory", "0.05")
    assert code == 0
    assert "warning: the estimate" in out and "exceeds the GPU's 51.20 MiB" in out and "given by --gpu-memory" in out
    assert "model.gradient_checkpointing=true" in out  # a knob of its largest terms
    code, out, _ = dry(capsys, TINY, "--gpu-memory", "80")
    assert "warning" not in out and "fits:" in out


def test_no_gpu_capacity_is_labelled_assumed(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: its capacity is read")
    _, out, _ = dry(capsys, TINY)
    assert "80.00 GiB  (assumed" in out


def test_dry_run_flags_without_dry_run_and_bad_world_sizes_are_refused(capsys):
    assert main(["train", TINY, "--world-size", "2"]) == 1
    assert "only apply to --dry-run" in capsys.readouterr().err
    code, _, err = dry(capsys, TINY, "--world-size", "2")
    assert code == 1 and "strategy.name=single runs one process" in err
    code, _, err = dry(capsys, TINY, "strategy.name=fsdp2", "--world-size", "3")
    assert code == 1 and "data.batch_size: 8 prompts per step cannot be split evenly over 3 ranks" in err


def test_manifest_rows_give_epochs_and_prompt_length(tmp_path, capsys):
    train = tmp_path / "train"
    train.mkdir()
    (train / "manifest.json").write_text(json.dumps({"count": 1000, "prompt_tokens": {"min": 40, "p50": 90,
                                                                                       "max": 300}}))
    code, out, err = dry(capsys, TINY, f"data.train=[{train}]", f"data.eval=[{tmp_path / 'none'}]")
    assert code == 0, err
    assert "1,000 rows (manifest), prompts 40-300 tokens" in out
    assert "epochs over the data: 0.40 (50 steps x 8 prompts / 1,000 rows)" in out
    assert "prompt 300 [data.max_prompt_tokens, the longest prompt of the manifests]" in out
    assert f"eval  {tmp_path / 'none'}: not prepared yet" in out


def test_local_config_wins_over_the_card(tmp_path, capsys):
    card = json.loads((Path("lightrft_mm/models/cards/Qwen--Qwen2.5-VL-7B-Instruct.json")).read_text())
    card["num_hidden_layers"] = 2
    folder = tmp_path / "Qwen2.5-VL-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(card))
    cfg = load_config("recipes/geo3k/qwen2_5_vl_7b.yaml", [f"model.name_or_path={folder}"])
    plan = make_plan(cfg, config_path="x", world_size=8)
    assert "config.json" in plan.source and "card" not in plan.source
    assert plan.shape.layers == 2 and plan.shape.params < 3e9  # the card (28 layers) has 8.29B


def test_tiny_terms_equal_real_bytes_after_one_step():
    """single, fp32, the vision tower and projector frozen (a text forward reaches every trainable
    parameter): parameters, gradients and AdamW state of the plan are the bytes the real model, its
    gradients and its optimizer hold after one real step."""
    from lightrft_mm.models import load_policy
    from lightrft_mm.models.trainable import apply_trainable
    from lightrft_mm.strategy import STRATEGIES

    cfg = load_config(TINY, ["model.freeze=[vision,projector]", "strategy.device=cpu"])
    terms = {t.name: t.bytes for t in make_plan(cfg, config_path=TINY, world_size=1).terms}
    model, _ = load_policy(cfg.model, seed=0)
    apply_trainable(model, cfg.model)
    strategy = STRATEGIES.get("single")(cfg.strategy, max_grad_norm=1.0)
    model, optimizer = strategy.prepare(model, functools.partial(torch.optim.AdamW, lr=1e-3))
    ids = torch.randint(0, 50, (2, 7))
    strategy.backward(model(input_ids=ids).logits.float().pow(2).mean())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    strategy.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0 and len(optimizer.state) > 0
    assert terms["parameters"] == params
    assert terms["gradients"] == grads
    assert terms["optimizer state"] == state


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_formula_matches_the_bytes_autograd_saves(precision):
    """The per-layer activation estimate against every tensor autograd keeps for the backward of a
    small Qwen2 decoder (sdpa), parameters excluded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lightrft_mm.trainer.plan_memory import Shape, per_token_layer

    h, inter, heads, kv_heads, layers = 256, 1352, 4, 1, 2
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=500, hidden_size=h, intermediate_size=inter,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=kv_heads, attn_implementation="sdpa"))
    model = model.to(torch.float32 if precision == "fp32" else torch.bfloat16)
    ids = torch.randint(0, 500, (2, 128))
    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = max(saved.get(t.untyped_storage().data_ptr(), 0),
                                                    t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.model(input_ids=ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in weights)
    cfg = load_config(None, [f"strategy.precision={precision}"])
    shape = Shape(params=0, trainable=0, trainable_tensors=0, layers=layers, hidden=h, intermediate=inter,
                  heads=heads, kv_dim=kv_heads * h // heads, largest_unit=0, vocab=500)
    b = 4 if precision == "fp32" else 2
    estimate = (layers * per_token_layer(cfg, shape, 128) + b * h) * ids.numel()
    assert abs(measured / estimate - 1) < 0.05, (measured, estimate)


def test_cached_config_wins_over_the_card_and_unknown_offline_models_are_named(tmp_path, monkeypatch, capsys):
    """A Hub id whose config.json is in the Hub cache plans from it, not from the card; a Hub id with
    neither a cached config nor a card, offline, is an error naming the model and the download."""
    card = json.loads(Path("lightrft_mm/models/cards/Qwen--Qwen2.5-VL-7B-Instruct.json").read_text())
    card["num_hidden_layers"] = 3
    repo = tmp_path / "models--Qwen--Qwen2.5-VL-7B-Instruct"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(card))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config("recipes/geo3k/qwen2_5_vl_7b.yaml", ["model.name_or_path=Qwen/Qwen2.5-VL-7B-Instruct"])
    plan = make_plan(cfg, config_path="x", world_size=8)
    assert plan.shape.layers == 3 and "card" not in plan.source
    code, _, err = dry(capsys, "recipes/geo3k/qwen2_5_vl_7b.yaml", "model.name_or_path=nobody/no-such-model")
    assert code == 1 and "'nobody/no-such-model' has no config.json here" in err
    assert "huggingface-cli download nobody/no-such-model config.json" in err


def test_7b_without_checkpointing_warns_and_names_activations(capsys):
    code, out, err = dry(capsys, "recipes/geo3k/qwen2_5_vl_7b.yaml", "model.gradient_checkpointing=false",
                         "--world-size", "8", "--gpu-memory", "80")
    assert code == 0, err
    assert "largest term: activations (" in out
    assert "warning: the estimate" in out and "model.gradient_checkpointing=true" in out


def test_vision_term_follows_freezing_and_checkpointing():
    def vision(*overrides):
        plan = make_plan(load_config(TINY, list(overrides)), config_path=TINY, world_size=1)
        return next(t.bytes for t in plan.terms if t.name.startswith("vision tower activations"))

    full, checkpointed = vision(), vision("model.gradient_checkpointing=true")
    assert full > checkpointed > 0
    assert vision("model.freeze=[vision]") == 0

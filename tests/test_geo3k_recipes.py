"""Every recipe validates on a fresh clone (no data/, no models, no vLLM environment, an empty
offline Hub cache), names its own file in its first-line launch command, and the Geo3K GPU
recipes keep the public recipes' settings. How validate treats data folders: one the launch line
prepares is "not prepared yet: <command>", one that exists is read in full, any other missing one
is a problem."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightrft_mm.config import load_config
from lightrft_mm.config.presence import launch_command, prepare_commands, presence_notes
from lightrft_mm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").glob("*/*.yaml"))
GEO3K_GPU = ["recipes/geo3k/qwen2_5_vl_7b.yaml", "recipes/geo3k/qwen2_5_vl_7b_dapo.yaml",
             "recipes/geo3k/qwen2_5_vl_7b_gspo.yaml", "recipes/geo3k/qwen2_5_vl_3b.yaml",
             "recipes/geo3k/qwen3_vl_8b.yaml", "recipes/geo3k/llava_1_5_7b.yaml"]


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """The repository's tracked files (as a clone has them), without data/, models/ or runs/."""
    copy = tmp_path_factory.mktemp("clone") / "repo"
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                               text=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(ROOT).as_posix() for d in ("lightrft_mm", "recipes") for p in (ROOT / d).rglob("*")]
    for name in files:
        if not name or name.split("/")[0] in ("data", "models", "runs") or not (ROOT / name).is_file():
            continue
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    return copy


def test_every_recipe_validates_on_a_fresh_clone(fresh_clone, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTRFT_MM_VLLM_PYTHON", "HF_HOME", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"), OMP_NUM_THREADS="1")
    script = ("import sys, lightrft_mm; from pathlib import Path; "
              "assert Path(lightrft_mm.__file__).resolve().is_relative_to(Path.cwd().resolve()), lightrft_mm.__file__; "
              "from lightrft_mm.cli import main; sys.exit(main(['validate', *sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", script, *RECIPES], cwd=fresh_clone, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert all(f"{recipe}: ok" in out for recipe in RECIPES), out
    assert not (fresh_clone / "data").exists() and not (tmp_path / "empty-cache").exists()
    blocks = {b.splitlines()[0].split(":")[0]: b for b in out.split("\nrecipes/")}
    seven_b = next(b for name, b in blocks.items() if name.endswith("geo3k/qwen2_5_vl_7b.yaml"))
    assert "model Qwen/Qwen2.5-VL-7B-Instruct: not downloaded yet; offline: download it before training with " \
           "`hf download Qwen/Qwen2.5-VL-7B-Instruct`" in seven_b
    assert "data.train[0] data/geo3k/train: not prepared yet: lightrft-mm prepare geo3k --src data/geometry3k " \
           "--split train --out data/geo3k/train" in seven_b
    assert "data.eval[0] data/geo3k/test: not prepared yet: lightrft-mm prepare geo3k" in seven_b
    if importlib.util.find_spec("vllm") is None:
        assert "rollout.engine=vllm: not installed yet; train refuses to start without it." in seven_b
        assert "make vllm" in seven_b


@pytest.mark.parametrize("recipe", RECIPES)
def test_first_line_is_the_launch_command_of_the_recipe_itself(recipe):
    first = (ROOT / recipe).read_text().splitlines()[0]
    assert first.startswith("# Launch: ") and launch_command(ROOT / recipe) == first[len("# Launch: "):]
    assert recipe in first.split() and ("lightrft-mm" in first or "lightrft_mm" in first)
    cfg = load_config(ROOT / recipe)
    prepared = prepare_commands(launch_command(ROOT / recipe))
    for folder in [*cfg.data.train, *cfg.data.eval]:  # every data folder comes from the launch line
        assert os.path.normpath(folder) in prepared or (cfg.data.synthetic and folder in (cfg.data.train[:1] +
                                                                                          cfg.data.eval[:1])), folder


@pytest.mark.parametrize("recipe", GEO3K_GPU)
def test_geo3k_gpu_recipes_keep_the_public_settings(recipe):
    """EasyR1 examples/config.yaml and verl run_qwen2_5_vl-7b.sh: n 5, lr 1e-6, 2048-token responses,
    low-variance KL 1e-2 for GRPO (DAPO and GSPO drop the KL term), bf16 on FSDP2, 8 GPUs."""
    cfg = load_config(ROOT / recipe)
    first = (ROOT / recipe).read_text().splitlines()[0]
    assert "torchrun --nproc_per_node 8 -m lightrft_mm train " + recipe in first
    assert "hf download hiyouga/geometry3k --repo-type dataset" in first
    assert "/" in cfg.model.name_or_path and not (ROOT / cfg.model.name_or_path).exists()  # a Hub id
    assert 5 <= cfg.rollout.n <= 8 and cfg.trainer.lr == 1e-6 and cfg.rollout.max_new_tokens == 2048
    assert cfg.strategy.name == "fsdp2" and cfg.strategy.precision == "bf16" and cfg.model.dtype == "bfloat16"
    assert cfg.data.batch_size % 8 == 0 and cfg.model.gradient_checkpointing
    assert cfg.rewards[0].name == "geo3k" and cfg.trainer.accuracy_reward == "math_accuracy"
    a = cfg.algorithm
    expected = "dapo" if "dapo" in recipe else "gspo" if "gspo" in recipe else "grpo"
    assert a.name == expected
    if expected == "grpo":
        assert (a.kl_coef, a.kl_estimator, a.kl_clamp, a.kl_in) == (0.01, "k3", 10.0, "loss")
    else:
        assert a.kl_coef == 0.0
    if expected == "dapo":
        assert (a.clip_eps, a.clip_eps_high, a.dynamic_sampling) == (0.2, 0.28, True)
    if expected == "gspo":
        assert (a.loss, a.aggregation, a.clip_eps, a.clip_eps_high) == ("gspo", "seq-mean-token-mean", 3e-4, 4e-4)
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm.mode == "colocate"


def test_validate_knows_the_family_of_a_hub_model_not_downloaded_yet(tmp_path, monkeypatch):
    """The built-in card (models.cards) gives a Hub model's type before any download, so validate
    refuses an engine that does not serve it (a look-alike local path gets no card)."""
    from lightrft_mm.rollout import vllm
    from lightrft_mm.strategy import model_type_of

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert model_type_of("Qwen/Qwen3-VL-8B-Instruct") == "qwen3_vl"
    assert model_type_of("llava-hf/llava-1.5-7b-hf") == "llava"
    assert model_type_of("somewhere/Qwen3-VL-8B-Instruct") == ""
    monkeypatch.setattr(vllm, "FAMILIES", tuple(f for f in vllm.FAMILIES if f != "qwen3_vl"))
    with pytest.raises(ConfigError, match="model type 'qwen3_vl' is not served by this engine"):
        load_config(ROOT / "recipes/geo3k/qwen3_vl_8b.yaml", ["rollout.engine=vllm"])


# --- data folders in validate ------------------------------------------------------------------------

def _recipe(tmp_path: Path, launch: str, folders: list[str]) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"# Launch: {launch}\nmodel: {{name_or_path: 'tiny:qwen2_5_vl'}}\n"
                    f"data: {{train: [{', '.join(folders)}]}}\nrewards: [exact_match]\n")
    return path


def test_prepare_commands_of_a_launch_line():
    line = ("hf download x/y --repo-type dataset --local-dir d && lightrft-mm prepare geo3k --src d --out a/train "
            "&& python -m lightrft_mm.prepare synthetic:colors --out=./b --n 4 && torchrun -m lightrft_mm train r.yaml")
    assert prepare_commands(line) == {"a/train": "lightrft-mm prepare geo3k --src d --out a/train",
                                      "b": "python -m lightrft_mm.prepare synthetic:colors --out=./b --n 4"}


def test_missing_data_is_a_note_only_where_the_launch_line_prepares_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = "lightrft-mm prepare synthetic:colors --out data/x --n 8 --seed 1"
    path = _recipe(tmp_path, f"{prepared} && lightrft-mm train r.yaml", ["data/x"])
    assert presence_notes(load_config(path), path) == [f"data.train[0] data/x: not prepared yet: {prepared}"]
    path = _recipe(tmp_path, f"{prepared} && lightrft-mm train r.yaml", ["data/x", "data/other"])
    with pytest.raises(ConfigError, match=r"(?s)1 problem.*data.train\[1\]: 'data/other' does not exist. "
                                          r"Fix: prepare it \(`lightrft-mm prepare SOURCE --out data/other`"):
        presence_notes(load_config(path), path)


def test_existing_data_is_read_in_full(tmp_path, monkeypatch):
    from lightrft_mm.prepare import prepare_synthetic

    monkeypatch.chdir(tmp_path)
    prepare_synthetic("colors", tmp_path / "data" / "x", n=4, seed=0)
    path = _recipe(tmp_path, "lightrft-mm prepare synthetic:colors --out data/x && lightrft-mm train r.yaml",
                   ["data/x"])
    assert presence_notes(load_config(path), path) == []  # there, readable: nothing to say
    shard = tmp_path / "data" / "x" / "shard-00000.jsonl"
    shard.write_text(shard.read_text() + "{not json\n")
    with pytest.raises(ConfigError, match=r"data.train\[0\]: .*shard-00000.jsonl line 5: not valid JSON"):
        presence_notes(load_config(path), path)

"""Hub ids as model references (lightrft_mm.models.hub), offline: a tiny model saved into a local
Hugging Face cache in huggingface_hub's layout (models--org--name/blobs, snapshots/<commit>, refs/),
read back by id and revision; offline without a cached copy; validate's checks of a reference's
form; one training step by Hub id. No test touches the network."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightrft_mm.cli import main
from lightrft_mm.config import ModelConfig, load_config
from lightrft_mm.errors import ConfigError, ModelError
from lightrft_mm.models import hub, load_policy
from lightrft_mm.models.tiny import build_tiny

REPO = "lrmm-test/tiny-vl"
MAIN, V2 = "a" * 40, "b" * 40  # commits: refs/main -> MAIN (seed 0), refs/v2 -> V2 (seed 1)


def _cache_model(cache: Path, repo: str, commit: str, folder: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put the files of `folder` into `cache` as huggingface_hub stores a download of `repo` at `commit`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / f.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Two tiny Qwen2.5-VL model folders (seeds 0 and 1) with their processors."""
    root = tmp_path_factory.mktemp("tiny-src")
    folders = {}
    for seed in (0, 1):
        model, processor = build_tiny("qwen2_5_vl", seed=seed)
        folders[seed] = root / f"seed{seed}"
        model.save_pretrained(folders[seed])
        processor.save_pretrained(folders[seed])
    return folders


@pytest.fixture
def cache(tmp_path, monkeypatch, saved_models):
    """An offline Hub cache (HF_HUB_CACHE) holding REPO at MAIN (main) and V2 (branch v2)."""
    cache = tmp_path / "hub-cache"
    _cache_model(cache, REPO, MAIN, saved_models[0], refs=("main",))
    _cache_model(cache, REPO, V2, saved_models[1], refs=("v2",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resolve_picks_the_snapshot_of_each_revision(cache):
    root = cache / "models--lrmm-test--tiny-vl" / "snapshots"
    assert hub.is_hub_id(REPO)
    assert hub.resolve(REPO) == root / MAIN
    assert hub.resolve(REPO, "main") == root / MAIN
    assert hub.resolve(REPO, "v2") == root / V2
    assert hub.resolve(REPO, MAIN) == root / MAIN  # a commit hash
    assert hub.read_config(REPO, "v2")["model_type"] == "qwen2_5_vl"
    from lightrft_mm.strategy import model_type_of

    assert model_type_of(REPO) == "qwen2_5_vl"


def test_load_by_hub_id_honours_the_revision(cache, saved_models):
    expected = {seed: _weights(build_tiny("qwen2_5_vl", seed=seed)[0]) for seed in (0, 1)}
    for revision, seed in (("", 0), ("v2", 1), (MAIN, 0)):
        model, processor = load_policy(ModelConfig(name_or_path=REPO, revision=revision))
        got = _weights(model)
        assert got.keys() == expected[seed].keys()
        assert all(torch.equal(got[k], expected[seed][k]) for k in got), f"revision {revision!r} is not seed {seed}"
        assert processor.tokenizer.get_vocab() == build_tiny("qwen2_5_vl")[1].tokenizer.get_vocab()


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_without_a_cached_copy_says_how_to_download(cache, monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ModelError) as e:
        hub.resolve("lrmm-test/absent")
    text = str(e.value)
    assert f"offline ({variable}=1)" in text and "no cached copy of lrmm-test/absent (revision main)" in text
    assert "`hf download lrmm-test/absent`" in text and str(cache) in text
    with pytest.raises(ModelError, match=r"\(revision v3\) exists.*`hf download lrmm-test/tiny-vl --revision v3`"):
        hub.resolve(REPO, "v3")  # the repository is cached, that revision is not


def test_hf_home_is_the_cache_when_hf_hub_cache_is_unset(tmp_path, monkeypatch, saved_models):
    snapshot = _cache_model(tmp_path / "home" / "hub", "lrmm-test/other", MAIN, saved_models[0], refs=("main",))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    assert hub.resolve("lrmm-test/other") == snapshot


def test_an_incomplete_cached_copy_is_refused(cache, saved_models, tmp_path):
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_bytes((saved_models[0] / "config.json").read_bytes())
    _cache_model(cache, "lrmm-test/partial", MAIN, only_config, refs=("main",))
    assert hub.read_config("lrmm-test/partial")["model_type"] == "qwen2_5_vl"  # config alone is enough here
    with pytest.raises(ModelError, match=r"incomplete \(missing weights \(\*\.safetensors\)\).*hf download "
                                         "lrmm-test/partial"):
        hub.resolve("lrmm-test/partial")


def test_online_download_goes_through_snapshot_download(cache, monkeypatch):
    """Online, resolve asks huggingface_hub for the snapshot (cache, revision, skipped duplicates,
    progress bars off where asked) and turns a network failure into a ModelError with the fix."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []
    files = [SimpleNamespace(rfilename=f) for f in ("config.json", "model.safetensors", "pytorch_model.bin")]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, name, revision=None: SimpleNamespace(
        siblings=files))

    def fake_snapshot(name, **kwargs):
        calls.append((name, kwargs, are_progress_bars_disabled()))
        return str(cache / "models--lrmm-test--tiny-vl" / "snapshots" / V2)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert hub.resolve("lrmm-test/tiny-vl", "v2", progress=False).name == V2
    (name, kwargs, disabled), = calls
    assert name == REPO and kwargs["revision"] == "v2" and Path(kwargs["cache_dir"]) == cache and disabled
    assert "*.bin" in kwargs["ignore_patterns"] and "*.safetensors" not in kwargs["ignore_patterns"]
    assert not kwargs.get("local_files_only")

    def no_network(name, **kwargs):
        import httpx

        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelError, match=r"lrmm-test/fresh \(revision main\): could not be downloaded \(ConnectError"
                                         r".*`hf download lrmm-test/fresh`.*HF_HUB_OFFLINE=1"):
        hub.resolve("lrmm-test/fresh")


# --- validate: the form of a reference, not the presence of its weights ----------------------------

def test_validate_passes_a_hub_model_not_downloaded_yet(cache, capsys):
    assert main(["validate", "recipes/demo/colors.yaml", "model.name_or_path=lrmm-test/not-yet"]) == 0
    out = capsys.readouterr().out
    assert "model lrmm-test/not-yet: not downloaded yet; offline: download it before training with " \
           "`hf download lrmm-test/not-yet`" in out
    assert main(["validate", "recipes/demo/colors.yaml", f"model.name_or_path={REPO}", "model.revision=v2"]) == 0
    assert f"model {REPO} (revision v2): cached in {cache / 'models--lrmm-test--tiny-vl' / 'snapshots' / V2}" \
        in capsys.readouterr().out


def test_a_missing_folder_that_looks_like_a_hub_id_is_named_both_ways(cache, tmp_path, monkeypatch):
    """`models/X` with ./models there but no ./models/X: read as a Hub id, and the note says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    note = hub.describe("models/Qwen2.5-VL-7B-Instruct")
    assert "not downloaded yet" in note and "hf download models/Qwen2.5-VL-7B-Instruct" in note
    assert f"no local folder {tmp_path / 'models' / 'Qwen2.5-VL-7B-Instruct'} exists" in note
    assert "local folder" not in hub.describe("lrmm-test/elsewhere")  # no ./lrmm-test: a plain Hub id


@pytest.mark.parametrize("name, expected", [
    ("Qwen/Qwen2.5 VL", "neither a local folder nor a well-formed Hub id"),
    ("Qwen/Qwen--VL", "neither a local folder nor a well-formed Hub id"),
    ("Qwen2.5-VL-7B-Instruct", "neither a local folder nor a well-formed Hub id"),
    ("models/Qwen/Qwen2.5-VL-7B-Instruct", "folder 'models/Qwen/Qwen2.5-VL-7B-Instruct' does not exist"),
    ("./models/qwen", "folder './models/qwen' does not exist"),
])
def test_validate_refuses_a_malformed_reference(name, expected, capsys):
    assert main(["validate", "recipes/demo/colors.yaml", f"model.name_or_path={name}"]) == 1
    err = capsys.readouterr().err
    assert f"model.name_or_path: {expected}" in err or f"model.name_or_path: '{name}' is {expected}" in err, err
    assert "Fix:" in err and "Qwen/Qwen2.5-VL-7B-Instruct" in err


def test_validate_refuses_a_folder_without_config_and_a_revision_that_cannot_apply(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config("recipes/demo/colors.yaml", [f"model.name_or_path={tmp_path}"])
    with pytest.raises(ConfigError, match="model.revision: only applies to Hub ids; a tiny: model"):
        load_config("recipes/demo/colors.yaml", ["model.revision=v2"])


# --- train by Hub id --------------------------------------------------------------------------------

def test_train_one_step_by_hub_id(cache, tmp_path, capsys):
    from lightrft_mm.prepare import prepare_synthetic

    data = prepare_synthetic("colors", tmp_path / "data", n=8, seed=0)
    reward = tmp_path / "length_reward.py"  # differs between completions from the first step on
    reward.write_text("def length(inputs):\n    return [len(x.completion) / 10 for x in inputs]\n")
    out = tmp_path / "run"
    assert main(["train", "recipes/demo/colors.yaml", f"model.name_or_path={REPO}", "model.revision=v2",
                 f"data.train=[{data}]", "data.eval=[]", "data.synthetic=", f"trainer.output_dir={out}",
                 f"rewards=[{{name: '{reward}:length'}}]",
                 "trainer.max_steps=1", "data.batch_size=2", "rollout.n=2", "rollout.max_new_tokens=4",
                 "warmup.steps=0", "logging.progress=false", "logging.plot=false"]) == 0, capsys.readouterr().err
    assert "trained: " in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["name_or_path"] == REPO and saved["revision"] == "v2"
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any(r.get("step") == 1 for r in steps)
    from lightrft_mm.models import load_pretrained

    start = _weights(build_tiny("qwen2_5_vl", seed=1)[0])  # revision v2 is the seed-1 model
    trained = _weights(load_pretrained(out / "checkpoint-final")[0])
    changed = [k for k in trained if not torch.equal(trained[k], start[k])]
    assert changed, "no weight moved from the v2 snapshot"
    main_weights = _weights(build_tiny("qwen2_5_vl", seed=0)[0])
    distance = lambda ref: sum((trained[k].float() - ref[k].float()).abs().sum().item() for k in trained)  # noqa: E731
    assert distance(start) < distance(main_weights) / 10, "the run did not start from revision v2"


def test_train_resolves_the_hub_model_before_anything_else(cache, tmp_path, capsys):
    """Offline with no cached copy, train stops before its run folder or its data is made."""
    out, data = tmp_path / "run", tmp_path / "colors-train"
    assert main(["train", "recipes/demo/colors.yaml", "model.name_or_path=lrmm-test/absent",
                 f"trainer.output_dir={out}", f"data.train=[{data}]", "data.eval=[]"]) == 1
    err = capsys.readouterr().err
    assert "no cached copy of lrmm-test/absent (revision main)" in err and "hf download lrmm-test/absent" in err
    assert not out.exists() and not data.exists()

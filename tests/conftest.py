"""Shared fixtures: small images and Samples made on the fly (no hub, no network), and the
held-out check the demo tests share."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lightrft_mm.schema import Sample

# DeepSpeed builds a shared-memory op on first use (~60 s): one build for every test process.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lightrft_mm" / "torch_extensions"))


def pytest_collection_modifyitems(items):
    """Files holding end-to-end (`slow`) or `distributed` tests first: `make test` hands whole
    files to its worker processes in this order, so the long ones start first and the short ones
    fill in at the end, instead of one worker finishing a long file alone."""
    long = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("distributed")}
    items.sort(key=lambda item: item.path not in long)


@pytest.fixture(autouse=True, scope="session")
def _run_from_repo_root():
    """Tests name recipes and docs relative to the repository, wherever pytest was started."""
    before = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])
    yield
    os.chdir(before)


@pytest.fixture(scope="session")
def image_paths(tmp_path_factory):
    """Three random RGB PNGs of different sizes (so Qwen grids and prompt lengths differ)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(84, 84), (112, 56), (56, 140)]):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="session")
def image_samples(image_paths):
    """Prompts of mixed lengths, with and without a system message, image first or last."""
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": [
            {"type": "image", "image": image_paths[0]}, {"type": "text", "text": "What colour?"}]}],
         "answer": "red", "choices": ["red", "blue"]},
        {"id": "b", "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer with one word."},
            {"role": "user", "content": [{"type": "image", "image": image_paths[1]},
                                         {"type": "text", "text": "How many shapes are in the image? Count them."}]}],
         "answer": "blue", "choices": ["red", "blue"]},
        {"id": "c", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe"}, {"type": "image", "image": image_paths[2]}]}],
         "answer": "red", "choices": ["red", "blue"]},
    ]
    return [Sample.from_dict(r) for r in rows]


@pytest.fixture
def installed_reward_plugin(tmp_path, monkeypatch):
    """An installed package (`lrmm_plugin_pkg`) with a reward in entry point group
    `lightrft_mm.rewards`: what `pip install` leaves on sys.path, written without network.

    Yields the entry point's name, `politeness` (1.0 when the completion says "please").
    """
    import sys
    import textwrap

    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "lrmm_plugin_mod.py").write_text(textwrap.dedent("""
        def politeness(inputs):
            return [float("please" in x.completion) for x in inputs]
    """))
    info = site / "lrmm_plugin_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lrmm_plugin_pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lightrft_mm.rewards]\npoliteness = lrmm_plugin_mod:politeness\n")
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(site))
    yield "politeness"
    sys.modules.pop("lrmm_plugin_mod", None)


@pytest.fixture(scope="session")
def checkpoint_accuracy():
    """`(checkpoint, folders, max_new_tokens=) -> [accuracy per folder]` (see `_checkpoint_accuracy`)."""
    return _checkpoint_accuracy


def _checkpoint_accuracy(checkpoint, folders, *, max_new_tokens: int) -> list[float]:
    """Greedy exact-match accuracy of a saved checkpoint on each prepared folder, evaluated the
    way the trainer does (the family's adapter, the HF rollout engine)."""
    from lightrft_mm.datasets.loader import load_samples
    from lightrft_mm.models import load_pretrained
    from lightrft_mm.processors import make_adapter
    from lightrft_mm.rewards import REWARDS
    from lightrft_mm.rollout.hf import HFRolloutEngine
    from lightrft_mm.trainer.evaluate import evaluate

    model, processor = load_pretrained(checkpoint)
    adapter = make_adapter(model, processor)
    engine = HFRolloutEngine(model, adapter)
    fns = [("exact_match", REWARDS.get("exact_match"), 1.0)]
    return [evaluate(engine, adapter, load_samples([folder]), fns, accuracy_reward="exact_match",
                     max_new_tokens=max_new_tokens)["accuracy"] for folder in folders]

"""Tests of the synthetic colours task, `prepare`'s output folder rules and the shard loader."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightrft_mm.datasets.loader import batches, load_samples, shard_files
from lightrft_mm.datasets.synthetic import COLORS, COLORS_PROMPT, generate
from lightrft_mm.errors import DataError, LightRFTError
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.schema import Sample


def _pixels(sample: Sample) -> np.ndarray:
    (part,) = sample.media("image")
    with Image.open(part.image) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "colors"
    prepare_synthetic("colors", out, n=12, seed=5)
    return out


@pytest.fixture(scope="module")
def samples(shard) -> list[Sample]:
    return load_samples([str(shard)])


# --- synthetic colours ------------------------------------------------------------------------

def test_colors_sizes_classes_and_images(samples):
    assert len(samples) == 12
    assert len({s.id for s in samples}) == 12
    assert Counter(s.answer for s in samples) == {name: 3 for name in COLORS}
    for s in samples:
        assert s.source == "synthetic:colors"
        assert s.choices == list(COLORS) and s.answer in s.choices
        assert s.prompt_text() == COLORS_PROMPT
        (part,) = s.media("image")
        assert os.path.isabs(part.image) and Path(part.image).is_file()
        with Image.open(part.image) as im:
            assert im.size == (84, 84) and im.mode == "RGB"


def test_colors_image_shows_the_answer(samples):
    """The mean colour of each image is nearest to its answer's colour: the task is solvable."""
    refs = {name: np.array(rgb, dtype=float) for name, rgb in COLORS.items()}
    for s in samples:
        mean = _pixels(s).reshape(-1, 3).mean(0)
        nearest = min(refs, key=lambda name: np.linalg.norm(refs[name] - mean))
        assert nearest == s.answer, (s.id, mean)


def test_colors_balanced_when_n_is_not_a_multiple(tmp_path):
    got = generate("colors", 10, 0, tmp_path)
    counts = Counter(s.answer for s in got)
    assert sum(counts.values()) == 10 and set(counts) == set(COLORS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_colors_deterministic_for_a_seed(tmp_path):
    a = load_samples([prepare_synthetic("colors", tmp_path / "a", n=8, seed=3)])
    b = load_samples([prepare_synthetic("colors", tmp_path / "b", n=8, seed=3)])
    assert [s.id for s in a] == [s.id for s in b]
    assert [s.answer for s in a] == [s.answer for s in b]
    for x, y in zip(a, b):
        assert np.array_equal(_pixels(x), _pixels(y))
    assert (tmp_path / "a" / "shard-00000.jsonl").read_text() == \
        (tmp_path / "b" / "shard-00000.jsonl").read_text()


def test_colors_different_seeds_differ(tmp_path):
    a = load_samples([prepare_synthetic("colors", tmp_path / "a", n=8, seed=1)])
    b = load_samples([prepare_synthetic("colors", tmp_path / "b", n=8, seed=2)])
    by_index_a = {s.meta["index"]: s for s in a}
    by_index_b = {s.meta["index"]: s for s in b}
    for i in range(8):
        # Same class at the same index, but different jitter and noise.
        assert by_index_a[i].answer == by_index_b[i].answer
        assert not np.array_equal(_pixels(by_index_a[i]), _pixels(by_index_b[i]))
    assert {s.id for s in a}.isdisjoint({s.id for s in b})


def test_colors_rejects_n_below_one(tmp_path):
    with pytest.raises(DataError, match="--n must be >= 1"):
        generate("colors", 0, 0, tmp_path)


def test_unknown_synthetic_task_suggests_the_closest(tmp_path):
    with pytest.raises(LightRFTError, match="did you mean 'colors'"):
        prepare_synthetic("colorz", tmp_path / "out", n=4, seed=0)


# --- prepare: never overwrite without --overwrite --------------------------------------------

def test_prepare_refuses_a_non_empty_out_and_loses_nothing(tmp_path):
    out = tmp_path / "colors"
    prepare_synthetic("colors", out, n=4, seed=1)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError) as exc:
        prepare_synthetic("colors", out, n=8, seed=2)
    assert str(out) in str(exc.value) and "--overwrite" in str(exc.value)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == {**before, Path("notes.txt"): b"mine"}


def test_prepare_into_an_empty_existing_folder(tmp_path):
    out = tmp_path / "colors"
    out.mkdir()
    prepare_synthetic("colors", out, n=4, seed=0)
    assert len(load_samples([out])) == 4


def test_prepare_with_overwrite_replaces(tmp_path):
    out = tmp_path / "colors"
    prepare_synthetic("colors", out, n=4, seed=1)
    (out / "notes.txt").write_text("old")
    prepare_synthetic("colors", out, n=8, seed=2, overwrite=True)
    assert not (out / "notes.txt").exists()
    new = load_samples([out])
    assert len(new) == 8 and all(s.id.startswith("colors-2-") for s in new)
    assert sorted(p.name for p in (out / "media").iterdir()) == sorted(f"colors-2-{i}.png" for i in range(8))


@pytest.mark.parametrize("task, n", [("colorz", 4), ("colors", 0)])
def test_failed_overwrite_loses_nothing(tmp_path, task, n):
    out = tmp_path / "colors"
    prepare_synthetic("colors", out, n=4, seed=1)
    with pytest.raises(LightRFTError):
        prepare_synthetic(task, out, n=n, seed=2, overwrite=True)
    assert (out / "shard-00000.jsonl").is_file(), "the old shard was deleted"
    assert len(load_samples([out])) == 4


# --- loading shards ---------------------------------------------------------------------------

def test_load_samples_resolves_media_from_any_cwd(shard, tmp_path, monkeypatch):
    monkeypatch.chdir(shard.parent)
    got = load_samples([shard.name])  # a relative shard path
    monkeypatch.chdir(tmp_path)       # media must not depend on the cwd any more
    assert len(got) == 12
    for s in got:
        (part,) = s.media("image")
        assert os.path.isabs(part.image)
        assert Path(part.image).is_file()
        assert Path(part.image).resolve().parent == (shard / "media").resolve()


def test_load_samples_of_a_file_and_several_shards(shard, tmp_path):
    other = prepare_synthetic("colors", tmp_path / "other", n=4, seed=9)
    got = load_samples([str(shard / "shard-00000.jsonl"), other])
    assert len(got) == 16
    assert sum(s.id.startswith("colors-9-") for s in got) == 4
    assert all(Path(s.media("image")[0].image).is_file() for s in got)


def test_shard_files_of_a_folder_are_sorted(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in shard_files(tmp_path)] == ["a.jsonl", "b.jsonl"]
    assert shard_files(tmp_path / "b.jsonl") == [tmp_path / "b.jsonl"]


def test_shard_files_missing_path_names_it_and_suggests_prepare(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as exc:
        shard_files(missing)
    text = str(exc.value)
    assert str(missing) in text
    assert f"python -m lightrft_mm.prepare SOURCE --out {missing}" in text


def test_shard_files_empty_folder_names_it_and_suggests_prepare(tmp_path):
    with pytest.raises(DataError) as exc:
        load_samples([tmp_path])
    text = str(exc.value)
    assert str(tmp_path) in text and "no .jsonl" in text
    assert f"python -m lightrft_mm.prepare SOURCE --out {tmp_path}" in text


# --- batches ----------------------------------------------------------------------------------

def _ids(batch):
    return [s.id for s in batch]


def _take(it, k):
    return [_ids(next(it)) for _ in range(k)]


def test_batches_deterministic_for_a_seed(samples):
    assert _take(batches(samples, 4, seed=7), 9) == _take(batches(samples, 4, seed=7), 9)
    assert _take(batches(samples, 4, seed=7), 3) != _take(batches(samples, 4, seed=8), 3)


def test_batches_cover_every_sample_once_per_epoch_and_reshuffle(samples):
    it = batches(samples, 4, seed=0)
    epochs = [_take(it, 3) for _ in range(3)]  # 12 samples / 4 = 3 batches per epoch
    every = sorted(s.id for s in samples)
    orders = []
    for epoch in epochs:
        assert all(len(b) == 4 for b in epoch)
        flat = [i for b in epoch for i in b]
        assert sorted(flat) == every  # each sample exactly once
        orders.append(flat)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert orders[0] != sorted(orders[0]) or orders[1] != sorted(orders[1])  # really shuffled


def test_batches_keep_full_batches_when_size_does_not_divide(samples):
    """10 of 12 samples per epoch in batches of 5: the shuffled tail (2) waits for a later epoch."""
    it = batches(samples, 5, seed=0)
    seen = set()
    for _ in range(6):  # three epochs of two batches
        a, b = _ids(next(it)), _ids(next(it))
        assert len(a) == len(b) == 5
        assert not set(a) & set(b)
        seen |= set(a) | set(b)
    assert len(seen) > 10


def test_batches_larger_than_the_data(samples):
    first = _ids(next(batches(samples, 100, seed=0)))
    assert sorted(first) == sorted(s.id for s in samples)


def test_batches_do_not_change_the_input(samples):
    before = _ids(samples)
    _take(batches(samples, 4, seed=3), 6)
    assert _ids(samples) == before


def test_batches_of_nothing_is_a_data_error():
    with pytest.raises(DataError, match="no training samples"):
        next(batches([], 4, seed=0))

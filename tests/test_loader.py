"""`PromptLoader`: mixing by weight, deterministic shuffles, rank sharding, saved positions
that resume exactly, and the overlong-prompt filter; `DataConfig.weights` / `max_prompt_tokens`."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lightrft_mm.errors import ConfigError

from lightrft_mm.config import DataConfig, load_config
from lightrft_mm.datasets import loader as L
from lightrft_mm.datasets.loader import PromptLoader
from lightrft_mm.errors import DataError
from lightrft_mm.schema import Sample, write_jsonl


def _samples(prefix: str, n: int, words: int = 1) -> list[Sample]:
    return [Sample.from_dict({"id": f"{prefix}{i}", "messages": [
        {"role": "user", "content": " ".join(["w"] * (words + i % 3))}], "answer": "x"}) for i in range(n)]


def _ids(batch) -> list[str]:
    return [s.id for s in batch]


def _take(loader, k) -> list[list[str]]:
    return [_ids(next(loader)) for _ in range(k)]


@pytest.fixture
def folders(tmp_path):
    """Two prepared-style folders: a/ with 10 samples, b/ with 4."""
    for name, n in (("a", 10), ("b", 4)):
        (tmp_path / name).mkdir()
        write_jsonl(_samples(name, n), tmp_path / name / "shard-00000.jsonl")
        (tmp_path / name / "rejects.jsonl").write_text('{"row": 0}\n')  # never read as samples
    return tmp_path


@pytest.mark.parametrize("weights", [None, [3, 1]])
def test_resume_yields_exactly_the_batches_that_would_have_come_next(weights):
    sources = [_samples("a", 10), _samples("b", 4)]
    run = PromptLoader(sources, batch_size=3, seed=7, weights=weights, rank=0, world_size=1)
    _take(run, 5)
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
    expected = _take(run, 12)
    resumed = PromptLoader(sources, batch_size=3, seed=7, weights=weights, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert _take(resumed, 12) == expected
    assert state["step"] == 5


def test_resume_refuses_changed_data_or_settings():
    sources = [_samples("a", 10)]
    state = PromptLoader(sources, batch_size=2, seed=0, rank=0, world_size=1).state_dict()
    for other in (PromptLoader([_samples("a", 9)], batch_size=2, seed=0, rank=0, world_size=1),
                  PromptLoader(sources, batch_size=3, seed=0, rank=0, world_size=1),
                  PromptLoader(sources, batch_size=2, seed=1, rank=0, world_size=1)):
        with pytest.raises(DataError, match="cannot resume the data position"):
            other.load_state_dict(state)


def test_seed_decides_the_order():
    make = lambda seed: PromptLoader([_samples("a", 12)], batch_size=4, seed=seed, rank=0, world_size=1)  # noqa: E731
    assert _take(make(3), 9) == _take(make(3), 9)
    assert _take(make(3), 3) != _take(make(4), 3)


@pytest.mark.parametrize("weights", [None, [1, 1]])
def test_ranks_split_every_global_batch(weights):
    sources = [_samples("a", 12), _samples("b", 6)]
    whole = PromptLoader(sources, batch_size=6, seed=1, weights=weights, rank=0, world_size=1)
    ranks = [PromptLoader(sources, batch_size=3, seed=1, weights=weights, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(7):
        full, r0, r1 = _ids(next(whole)), _ids(next(ranks[0])), _ids(next(ranks[1]))
        assert len(r0) == len(r1) == 3
        assert r0 == full[0::2] and r1 == full[1::2]
        if weights is None:
            assert not set(r0) & set(r1)  # pooled: a sample is in one rank's batch per epoch


def test_rank_and_world_come_from_torch_distributed(monkeypatch):
    import torch.distributed as dist

    assert L.dist_rank_world() == (0, 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    loader = PromptLoader([_samples("a", 8)], batch_size=2, seed=0)
    assert (loader.rank, loader.world_size) == (1, 2)
    assert _ids(next(loader)) == _ids(next(PromptLoader([_samples("a", 8)], batch_size=4, seed=0, rank=0,
                                                        world_size=1)))[1::2]


def test_weights_set_the_mixture():
    sources = [_samples("a", 10), _samples("b", 4)]
    mixed = PromptLoader(sources, batch_size=8, seed=0, weights=[3, 1], rank=0, world_size=1)
    counts = Counter(i[0] for b in _take(mixed, 200) for i in b)
    assert abs(counts["a"] / 1600 - 0.75) < 0.04
    # each source is read in whole reshuffled epochs: b's 4 samples appear equally often
    b_counts = Counter(i for b in _take(mixed, 100) for i in b if i.startswith("b"))
    assert max(b_counts.values()) - min(b_counts.values()) <= 1
    only_a = PromptLoader(sources, batch_size=8, seed=0, weights=[1, 0], rank=0, world_size=1)
    assert all(i.startswith("a") for b in _take(only_a, 20) for i in b)
    pooled = PromptLoader(sources, batch_size=7, seed=0, rank=0, world_size=1)
    assert Counter(i[0] for b in _take(pooled, 20) for i in b) == {"a": 100, "b": 40}  # 2 per epoch each


@pytest.mark.parametrize("weights", [[1], [1, -1], [0, 0], ["x", 1]])
def test_bad_weights(weights):
    with pytest.raises(DataError, match="data.weights"):
        PromptLoader([_samples("a", 3), _samples("b", 3)], batch_size=2, weights=weights, rank=0, world_size=1)


def test_too_few_samples_for_the_ranks():
    with pytest.raises(DataError, match="every rank needs"):
        PromptLoader([_samples("a", 1)], batch_size=2, rank=0, world_size=2)


def test_overlong_prompts_are_dropped_and_counted(folders):
    words = lambda s: len(s.prompt_text().split())  # noqa: E731  (1, 2 or 3 words here)
    loader = PromptLoader.from_paths([folders / "a", folders / "b"], batch_size=2, seed=0,
                                     max_prompt_tokens=2, token_len=words, rank=0, world_size=1)
    assert loader.filtered == 3 + 1  # a: ids 2, 5, 8; b: id 2
    assert all(words(s) <= 2 for s in loader.samples) and len(loader.samples) == 10
    assert all(words(s) <= 2 for _ in range(20) for s in next(loader))
    with pytest.raises(DataError, match=r"every one of its 10 prompts is longer than data.max_prompt_tokens=1 "
                                        r"\(the shortest has 5 tokens\)"):
        PromptLoader.from_paths([folders / "a"], batch_size=2, max_prompt_tokens=1,
                                token_len=lambda s: 5, rank=0, world_size=1)


def test_data_config_fields_change_the_batches(folders):
    a, b = str(folders / "a"), str(folders / "b")
    pooled = PromptLoader.from_config(DataConfig(train=[a, b], batch_size=4), seed=0, rank=0, world_size=1)
    weighted = PromptLoader.from_config(DataConfig(train=[a, b], batch_size=4, weights=[0, 1]), seed=0,
                                        rank=0, world_size=1)
    assert {i[0] for x in _take(pooled, 10) for i in x} == {"a", "b"}
    assert {i[0] for x in _take(weighted, 10) for i in x} == {"b"}
    short = PromptLoader.from_config(DataConfig(train=[a], batch_size=2, max_prompt_tokens=1), seed=0,
                                     token_len=lambda s: len(s.prompt_text().split()), rank=0, world_size=1)
    assert short.filtered == 6 and {s.id for s in short.samples} == {"a0", "a3", "a6", "a9"}
    with pytest.raises(DataError, match="does not fit 2 data.train folder"):
        PromptLoader.from_config(DataConfig(train=[a, b], weights=[1]), seed=0, rank=0, world_size=1)


def test_config_reads_the_new_keys():
    cfg = load_config(None, ["data.train=[a, b]", "data.weights=[0.7, 0.3]", "data.max_prompt_tokens=256"])
    assert cfg.data.weights == [0.7, 0.3] and cfg.data.max_prompt_tokens == 256
    assert DataConfig().weights == [] and DataConfig().max_prompt_tokens == 0


def test_validate_catches_weights_that_do_not_fit_the_folders():
    with pytest.raises(ConfigError, match="data.weights: \\[0.7, 0.3\\] does not fit 1 data.train folder"):
        load_config(None, ["data.train=[a]", "data.weights=[0.7, 0.3]"])

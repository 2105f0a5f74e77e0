"""`prepare geo3k`: the Hugging Face hiyouga/geometry3k layout (parquet and save_to_disk), built
offline with the dataset's exact column types; the Geo3K-like generator; the Geo3K recipes; and
one GRPO step on the prepared data."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lightrft_mm.cli import main
from lightrft_mm.config import load_config
from lightrft_mm.datasets.geo3k import DEFAULT_INSTRUCTION
from lightrft_mm.datasets.loader import PromptLoader, load_samples
from lightrft_mm.datasets.synthetic_geo import KINDS, geo3k_like, geo3k_rows, write_geo3k_parquet
from lightrft_mm.prepare import main as prepare_main
from lightrft_mm.schema import read_jsonl

SPLIT_ROWS = {"train": 10, "validation": 3, "test": 4}


def _png(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub_copy(tmp_path_factory) -> Path:
    """A local copy of hiyouga/geometry3k as the hub serves it: data/<split>-00000-of-00001.parquet."""
    root = tmp_path_factory.mktemp("geometry3k")
    for k, (split, n) in enumerate(SPLIT_ROWS.items()):
        write_geo3k_parquet(geo3k_rows(n, seed=k), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def _prepare(*args) -> int:
    return prepare_main([*map(str, args), "--no-progress"])


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fixture_has_the_column_types_of_the_hub_files(hub_copy):
    """The columns `datasets` writes for Features(images=List(Image), problem=string, ...)."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
        "answer": datasets.Value("string"), "id": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "ground_truth": datasets.Value("string")})
    ours = pq.read_schema(hub_copy / "data" / "train-00000-of-00001.parquet")
    assert ours.remove_metadata().equals(features.arrow_schema.remove_metadata())
    hf = json.loads(ours.metadata[b"huggingface"])["info"]["features"]
    assert datasets.Features.from_dict(hf) == features


def test_prepare_geo3k_parquet(hub_copy, tmp_path, capsys):
    out = tmp_path / "train"
    assert _prepare("geo3k", "--src", hub_copy, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "rows read                10" in printed and f"wrote 10 samples to {out}" in printed
    rows = pq.read_table(hub_copy / "data" / "train-00000-of-00001.parquet").to_pylist()
    samples = list(read_jsonl(out / "shard-00000.jsonl"))
    assert [s.id for s in samples] == [f"geo3k-train-{r['id']}" for r in rows]
    for row, s in zip(rows, samples):
        assert s.source == "geo3k" and s.answer == row["answer"] and s.choices == row["choices"]
        assert s.meta == {"split": "train", "row": int(row["id"]), "ground_truth": row["ground_truth"]}
        (user,) = s.messages
        image, text = user.content
        assert image.type == "image" and image.image == f"media/geo3k-train-{row['id']}-0.png"
        assert (out / image.image).read_bytes() == row["images"][0]["bytes"]  # the original bytes
        assert text.text == row["problem"].replace("<image>", "") + "\n" + DEFAULT_INSTRUCTION
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "geo3k" and manifest["options"]["split"] == "train"
    assert manifest["counts"]["media_files"] == 10 and manifest["source_fingerprint"].startswith("sha256:")
    assert (out / "rejects.jsonl").read_text() == ""


def test_split_selection_and_unknown_split(hub_copy, tmp_path, capsys):
    assert _prepare("geo3k", "--src", hub_copy, "--split", "test", "--out", tmp_path / "t") == 0
    assert len(load_samples([tmp_path / "t"])) == SPLIT_ROWS["test"]
    assert all(s.id.startswith("geo3k-test-") for s in load_samples([tmp_path / "t"]))
    assert _prepare("geo3k", "--src", hub_copy, "--split", "dev", "--out", tmp_path / "d") == 1
    err = capsys.readouterr().err
    assert "'dev'" in err and "test" in err and "validation" in err and "--split" in err
    assert not (tmp_path / "d").exists()


def test_save_to_disk_gives_the_same_shards(hub_copy, tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    splits = {s: datasets.Dataset.from_parquet(str(hub_copy / "data" / f"{s}-00000-of-00001.parquet"))
              for s in SPLIT_ROWS}
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    assert _prepare("geo3k", "--src", hub_copy, "--split", "validation", "--out", tmp_path / "a") == 0
    assert _prepare("geo3k", "--src", saved, "--split", "validation", "--out", tmp_path / "b") == 0
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    a.pop("manifest.json"), b.pop("manifest.json")  # the source fingerprints differ
    assert a == b and len([k for k in a if k.startswith("media/")]) == SPLIT_ROWS["validation"]


def test_images_go_where_their_placeholders_stood_and_instruction_is_configurable(tmp_path):
    rows = [{"images": [{"bytes": _png((255, 0, 0)), "path": "a.png"}, {"bytes": _png((0, 0, 255)), "path": None}],
             "problem": "In <image> and <image>, find y.", "answer": "3", "id": "7",
             "choices": ["1", "2", "3", "4"], "ground_truth": "C"}]
    write_geo3k_parquet(rows, tmp_path / "src" / "data" / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    assert _prepare("geo3k", "--src", tmp_path / "src", "--out", out, "--instruction", "Answer in \\boxed{}.") == 0
    (s,) = load_samples([out])
    parts = s.messages[0].content
    assert [p.type for p in parts] == ["text", "image", "text", "image", "text"]
    assert [p.text for p in parts if p.type == "text"] == ["In", "and", ", find y.\nAnswer in \\boxed{}."]
    colors = [Image.open(p.image).convert("RGB").getpixel((0, 0)) for p in parts if p.type == "image"]
    assert colors == [(255, 0, 0), (0, 0, 255)]
    out2 = tmp_path / "out2"
    assert _prepare("geo3k", "--src", tmp_path / "src", "--out", out2, "--instruction", "") == 0
    assert load_samples([out2])[0].messages[0].content[-1].text == ", find y."


def test_bad_geo3k_rows_are_rejected_with_reason_and_field(tmp_path, capsys):
    good = geo3k_rows(2, seed=3)
    bad = [dict(good[0], id="b1", images=[{"bytes": b"\x89PNG broken", "path": None}]),
           dict(good[0], id="b2", problem="<image><image> Find x."),
           dict(good[0], id="b3", answer=""),
           dict(good[0], id="b4", images=[]),
           dict(good[0], id="b5", problem=None)]
    write_geo3k_parquet([good[0], *bad, good[1]], tmp_path / "src" / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    assert _prepare("geo3k", "--src", tmp_path / "src", "--out", out) == 0
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    got = [(r["row"], r["id"], r["reason"], r["field"]) for r in rejects]
    assert got == [(1, "b1", "media_decode", "images[0]"), (2, "b2", "placeholder_mismatch", "problem"),
                   (3, "b3", "missing_answer", "answer"), (4, "b4", "missing_field", "images"),
                   (5, "b5", "missing_field", "problem")]
    assert all(r["message"].startswith(f"train-00000-of-00001.parquet row {r['row']}") for r in rejects)
    assert all("Fix" in r["message"] for r in rejects if r["reason"] != "media_decode")
    assert len(load_samples([out])) == 2
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["read"] == 7 and counts["written"] == 2 and counts["rejected"] == 5
    assert counts["rejected_by_reason"] == {"media_decode": 1, "missing_answer": 1, "missing_field": 2,
                                           "placeholder_mismatch": 1}
    printed = capsys.readouterr().out
    assert "placeholder_mismatch" in printed and "rejected                 5" in printed


def test_geo3k_without_src_says_how_to_get_it(tmp_path, capsys):
    assert _prepare("geo3k", "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "--src" in err and "hiyouga/geometry3k" in err


# --- the Geo3K-like generator ---------------------------------------------------------------

def test_geo3k_like_samples(tmp_path):
    samples = geo3k_like(40, 5, tmp_path / "media")
    assert len({s.id for s in samples}) == 40
    assert {s.meta["kind"] for s in samples} == set(KINDS)
    for s in samples:
        assert s.source == "synthetic:geo3k_like"
        assert len(s.choices) == 4 and len(set(s.choices)) == 4 and s.answer in s.choices
        assert all(float(c) > 0 for c in s.choices)
        image, text = s.messages[0].content
        assert text.text.endswith("\n" + DEFAULT_INSTRUCTION)
        with Image.open(tmp_path / image.image) as im:
            assert im.size == (224, 224)
            assert len(im.convert("L").getcolors(65536)) > 2  # a drawing, not a blank canvas
    # Sample i does not depend on n; other seeds give other problems.
    again = geo3k_like(10, 5, tmp_path / "again")
    assert [s.to_dict() for s in again] == [s.to_dict() for s in samples[:10]]
    other = geo3k_like(10, 6, tmp_path / "other")
    assert [s.answer for s in other] != [s.answer for s in again]


def test_geo3k_like_answers_follow_from_the_numbers(tmp_path):
    """Spot-check the computed answers against the problem's own numbers."""
    for s in geo3k_like(60, 1, tmp_path):
        kind, answer = s.meta["kind"], s.answer
        if kind == "circle_circumference":
            assert 2 * 3.14159 * 2 - 0.1 <= float(answer) <= 2 * 3.1416 * 15 + 0.1
            assert "." in answer
        else:
            assert answer.isdigit() and 0 < int(answer) < 1000


# --- recipes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe, overrides", [
    ("recipes/geo3k/tiny.yaml", []),
    ("recipes/geo3k/qwen2_5_vl_7b.yaml", ["model.name_or_path=tiny:qwen2_5_vl"]),
])
def test_geo3k_recipes_validate(recipe, overrides, capsys):
    assert main(["validate", recipe, *overrides]) == 0, capsys.readouterr().err
    first = Path(recipe).read_text().splitlines()[0]
    assert first.startswith("# Launch: ") and "lightrft-mm" in first and recipe in first
    assert ("synthetic:geo3k_like" if "tiny" in recipe else "prepare geo3k") in first


def test_7b_recipe_names_the_hub_model():
    """The model is a Hub id (tests/test_geo3k_recipes.py: validate passes without its weights)."""
    cfg = load_config("recipes/geo3k/qwen2_5_vl_7b.yaml", ["model.name_or_path=tiny:qwen2_5_vl"])
    assert cfg.data.train == ["data/geo3k/train"] and cfg.model.dtype == "bfloat16"
    assert load_config("recipes/geo3k/qwen2_5_vl_7b.yaml").model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"


# --- prepared Geo3K trains --------------------------------------------------------------------

def test_prepared_geo3k_loads_and_trains_a_step(hub_copy, tmp_path):
    """prepare geo3k -> loader -> one GRPO step of tiny Qwen2.5-VL; every weight moves, and
    data.max_prompt_tokens drops the long prompts (counted in data/filtered_long)."""
    from lightrft_mm.datasets.report import token_counter_for
    from lightrft_mm.models import load_pretrained
    from lightrft_mm.models.tiny import build_tiny
    from lightrft_mm.trainer.loop import train

    data = tmp_path / "geo3k"
    assert _prepare("geo3k", "--src", hub_copy, "--out", data) == 0
    samples = load_samples([data])
    lengths = [token_counter_for("tiny:qwen2_5_vl")(s) for s in samples]
    limit = sorted(lengths)[len(lengths) // 2]
    short = {s.id for s, n in zip(samples, lengths) if n <= limit}
    assert 2 <= len(short) < len(samples)
    reward = tmp_path / "length_reward.py"  # varies between completions from the first step
    reward.write_text(textwrap.dedent("""
        def length(inputs):
            return [len(x.completion) / 10 for x in inputs]
    """))
    out = tmp_path / "run"
    cfg = load_config("recipes/geo3k/tiny.yaml", [
        f"data.train=[{data}]", "data.eval=[]", f"trainer.output_dir={out}", "trainer.max_steps=1",
        "data.batch_size=2", "rollout.n=2", "rollout.max_new_tokens=4", "warmup.steps=0",
        f"data.max_prompt_tokens={limit}", f"rewards=[{{name: '{reward}:length'}}]",
        "logging.progress=false", "logging.plot=false", "logging.completions=4"])
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r.get("step") == 1 and "reward/mean" in r)
    assert step["data/filtered_long"] == len(samples) - len(short)
    traj = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert {t["id"] for t in traj} <= short
    initial, _ = build_tiny("qwen2_5_vl", seed=0)
    trained, _ = load_pretrained(out / "checkpoint-final")
    before = dict(initial.named_parameters())
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters that never changed: {unchanged}"
    loader = PromptLoader.from_paths([data], batch_size=2, seed=0, max_prompt_tokens=limit,
                                     token_len=token_counter_for("tiny:qwen2_5_vl"))
    assert loader.filtered == len(samples) - len(short) and {s.id for s in loader.samples} == short
    # A model folder (the run's checkpoint) counts prompt tokens with its saved processor.
    again = tmp_path / "again"
    assert _prepare("geo3k", "--src", hub_copy, "--out", again, "--model", out / "checkpoint-final") == 0
    stats = json.loads((again / "manifest.json").read_text())["prompt_tokens"]
    assert (stats["min"], stats["max"], stats["count"]) == (min(lengths), max(lengths), len(lengths))

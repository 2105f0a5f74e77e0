"""Media confined to the data root (prepare) and to the shard folder (loader), and lines that
are not UTF-8: rejected one by one, every other row kept."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from lightrft_mm.config import DataConfig
from lightrft_mm.datasets.loader import PromptLoader, load_samples
from lightrft_mm.errors import DataError
from lightrft_mm.prepare import main


def _prepare(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def _rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def _row(rid: str, image: str) -> dict:
    return {"id": rid, "prompt": "Which colour?", "image": image, "answer": "red"}


@pytest.fixture
def tree(tmp_path) -> Path:
    """data/ (the source's folder, with pics/red.png and a link out) and private/secret.png beside it."""
    (tmp_path / "data" / "pics").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(tmp_path / "data" / "pics" / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 250)).save(tmp_path / "private" / "secret.png")
    Image.new("RGB", (8, 8), (0, 0, 250)).save(tmp_path / "data" / "..secret.png")  # a name, not a parent
    (tmp_path / "data" / "link.png").symlink_to(tmp_path / "private" / "secret.png")
    (tmp_path / "data" / "pics" / "alias.png").symlink_to(tmp_path / "data" / "pics" / "red.png")
    return tmp_path


def _outside_rows(tree: Path) -> list[dict]:
    return [_row("good", "pics/red.png"),
            _row("dotdot", "../private/secret.png"),
            _row("absolute", str(tree / "private" / "secret.png")),
            _row("link", "link.png"),
            _row("inner-link", "pics/alias.png"),      # a link that stays inside is fine
            _row("dots-in-name", "..secret.png"),
            _row("absolute-inside", str(tree / "data" / "pics" / "red.png"))]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_rejects_media_outside_the_source_folder(tree):
    src = _write_jsonl(tree / "data" / "rows.jsonl", _outside_rows(tree))
    out = tree / "out"
    assert _prepare(src, "--out", out) == 0
    assert [s.id for s in load_samples([out])] == ["good", "inner-link", "dots-in-name", "absolute-inside"]
    rejects = _rejects(out)
    assert [(r["id"], r["row"], r["reason"], r["field"]) for r in rejects] == [
        ("dotdot", 1, "media_outside_root", "image"), ("absolute", 2, "media_outside_root", "image"),
        ("link", 3, "media_outside_root", "image")]
    secret = str((tree / "private" / "secret.png").resolve())
    for r in rejects:
        assert r["message"].startswith(f"rows.jsonl line {r['row'] + 1}, image: image path ")
        assert secret in r["message"] and str((tree / "data").resolve()) in r["message"]
        assert "--allow-outside-media" in r["message"] and "--media-root" in r["message"]
    assert "'../private/secret.png'" in rejects[0]["message"] and "'link.png'" in rejects[2]["message"]
    assert not any("secret" in p.name for p in (out / "media").iterdir())


def test_media_root_is_the_data_root_when_given(tree):
    src = _write_jsonl(tree / "rows.jsonl", [_row("good", "red.png"), _row("up", "../data/link.png"),
                                             _row("alias", "alias.png")])
    out = tree / "out"
    assert _prepare(src, "--out", out, "--media-root", tree / "data" / "pics") == 0
    assert [s.id for s in load_samples([out])] == ["good", "alias"]
    assert [(r["id"], r["reason"]) for r in _rejects(out)] == [("up", "media_outside_root")]


def test_allow_outside_media_accepts_them(tree):
    src = _write_jsonl(tree / "data" / "rows.jsonl", _outside_rows(tree))
    out = tree / "out"
    assert _prepare(src, "--out", out, "--allow-outside-media") == 0
    got = load_samples([out])
    assert len(got) == 7 and _rejects(out) == []
    # copied into the output: the prepared shards load without allow_outside_media
    assert all(Path(s.media()[0].image).resolve().parent == (out / "media").resolve() for s in got)


def test_a_latin1_byte_rejects_that_line_only(tree):
    src = tree / "data" / "rows.jsonl"
    lines = [json.dumps(_row("a", "pics/red.png")).encode(),
             b'{"id": "caf\xe9", "prompt": "x", "image": "pics/red.png", "answer": "red"}',
             json.dumps(_row("c", "pics/red.png")).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tree / "out"
    assert _prepare(src, "--out", out) == 0
    assert [s.id for s in load_samples([out])] == ["a", "c"]
    (r,) = _rejects(out)
    offset = len(lines[0]) + 1 + lines[1].index(b"\xe9")
    assert (r["row"], r["reason"], r["where"]) == (1, "bad_encoding", "rows.jsonl line 2")
    assert f"byte 0xe9 at byte offset {offset}" in r["message"] and "UTF-8" in r["message"]
    assert "Fix:" in r["message"]


def test_a_latin1_byte_in_csv_and_json_rejects_that_row_only(tree):
    good = {"prompt": "Which colour?", "image": "pics/red.png", "answer": "red"}
    with open(tree / "data" / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(good))
        writer.writeheader()
        writer.writerows([good, dict(good, answer="ROUGEXX"), good])
    raw = (tree / "data" / "t.csv").read_bytes().replace(b"ROUGEXX", b"rouge \xe9")
    (tree / "data" / "t.csv").write_bytes(raw)
    (tree / "data" / "t.json").write_bytes(json.dumps([good, dict(good, answer="ROUGEXX")]).encode()
                                           .replace(b"ROUGEXX", b"rouge \xe9"))
    for name, kept in (("t.csv", 2), ("t.json", 1)):
        out = tree / f"out-{name}"
        assert _prepare(tree / "data" / name, "--out", out) == 0, name
        assert len(load_samples([out])) == kept
        (r,) = _rejects(out)
        assert (r["row"], r["reason"]) == (1, "bad_encoding") and "answer" in r["message"], name
        assert "0xe9" in r["message"]


def test_all_rows_bad_still_writes_rejects(tree, capsys):
    src = tree / "data" / "rows.jsonl"
    src.write_bytes(b'{"id": "\xe9"}\n' + json.dumps(_row("x", "../private/secret.png")).encode() + b"\n")
    out = tree / "out"
    assert _prepare(src, "--out", out) == 1
    assert f"is in {out / 'rejects.jsonl'}" in capsys.readouterr().err
    assert [r["reason"] for r in _rejects(out)] == ["bad_encoding", "media_outside_root"]


# --- the loader -------------------------------------------------------------------------------

@pytest.fixture
def shard(tree) -> Path:
    out = tree / "shards"
    src = _write_jsonl(tree / "data" / "rows.jsonl", [_row("a", "pics/red.png"), _row("b", "pics/red.png")])
    assert _prepare(src, "--out", out) == 0
    return out


def _edit_row(shard: Path, k: int, image: str) -> Path:
    """Point row ``k`` of the prepared shard at ``image`` (what a hand-edited shard holds)."""
    f = shard / "shard-00000.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    rows[k]["messages"][0]["content"][0]["image"] = image
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.mark.parametrize("image", ["../private/secret.png", "ABS", "media/link.png"])
def test_loader_refuses_media_outside_the_shard_folder(tree, shard, image):
    (shard / "media" / "link.png").symlink_to(tree / "private" / "secret.png")
    if image == "ABS":
        image = str(tree / "private" / "secret.png")
    f = _edit_row(shard, 1, image)
    with pytest.raises(DataError) as exc:
        load_samples([shard])
    text = str(exc.value)
    assert text.startswith(f"{f} line 2 (id 'b'), messages[0].content[0].image: image path {image!r}")
    assert str((tree / "private" / "secret.png").resolve()) in text
    assert "data.allow_outside_media=true" in text and "Fix:" in text
    with pytest.raises(DataError, match="outside the shard folder"):
        PromptLoader.from_config(DataConfig(train=[str(shard)], batch_size=1), seed=0, rank=0, world_size=1)
    # trusted: the same shard loads, and the loader takes it from the config too
    a, b = load_samples([shard], allow_outside_media=True)
    assert Path(b.media()[0].image).resolve() == (tree / "private" / "secret.png").resolve()
    loader = PromptLoader.from_config(DataConfig(train=[str(shard)], batch_size=1, allow_outside_media=True),
                                      seed=0, rank=0, world_size=1)
    assert len(loader.samples) == 2


def test_loader_keeps_urls_as_they_are(shard):
    _edit_row(shard, 1, "https://example.com/a.png")
    assert load_samples([shard])[1].media()[0].image == "https://example.com/a.png"


def test_loader_names_a_line_that_is_not_utf8(shard):
    f = shard / "shard-00000.jsonl"
    lines = f.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"b"', b'"b\xe9"', 1)
    f.write_bytes(b"".join(lines))
    with pytest.raises(DataError) as exc:
        load_samples([shard])
    text = str(exc.value)
    assert text.startswith(f"{f} line 2: not valid UTF-8: byte 0xe9 at byte offset "
                           f"{len(lines[0]) + lines[1].index(bytes([0xe9]))} of the file")
    assert "Fix:" in text

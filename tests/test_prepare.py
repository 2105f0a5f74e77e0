"""`prepare` on generic sources (jsonl / json / csv / parquet / save_to_disk; flat fields, LLaVA
conversations, chat messages) and its output rules: rejects, determinism, workers, overwrite,
atomic finalisation, the summary table and the token histogram."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lightrft_mm.cli import main as cli_main
from lightrft_mm.datasets.loader import load_samples
from lightrft_mm.prepare import main

ROOT = Path(__file__).resolve().parents[1]


def _prepare(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """pics/ with three PNGs and a JPEG of known colours, and a file that is not an image."""
    root = tmp_path_factory.mktemp("src")
    (root / "pics").mkdir()
    for name, rgb in {"red.png": (250, 0, 0), "green.png": (0, 250, 0), "blue.png": (0, 0, 250)}.items():
        Image.new("RGB", (32, 32), rgb).save(root / "pics" / name)
    Image.new("RGB", (16, 16), (200, 200, 0)).save(root / "pics" / "yellow.jpg")
    (root / "pics" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _pixel(path: str):
    """The top-left colour, rounded to tens (the JPEG is lossy)."""
    with Image.open(path) as im:
        return tuple(round(v, -1) for v in im.convert("RGB").getpixel((0, 0)))


def test_fields_mapping_and_media_root(media, tmp_path):
    rows = [{"question": "What colour?", "img": "pics/red.png", "label": "red", "key": "q1"},
            {"question": "Compare <image> with <image>.", "img": ["pics/green.png", "pics/yellow.jpg"],
             "label": 2, "key": "q2", "opts": ["1", "2"]}]
    src = _write_jsonl(tmp_path / "table.jsonl", rows)
    out = tmp_path / "out"
    assert _prepare(src, "--out", out, "--map", "prompt=question", "--map", "image=img",
                    "--map", "answer=label", "--map", "id=key", "--map", "choices=opts",
                    "--media-root", media, "--source-name", "colours") == 0
    a, b = load_samples([out])
    assert (a.id, a.source, a.answer, a.choices, a.meta) == ("q1", "colours", "red", None, {"row": 0})
    assert [p.type for p in a.messages[0].content] == ["image", "text"]  # no token: image first
    assert _pixel(a.media()[0].image) == (250, 0, 0)
    assert [p.type for p in b.messages[0].content] == ["text", "image", "text", "image", "text"]
    assert [_pixel(p.image) for p in b.media()] == [(0, 250, 0), (200, 200, 0)]
    assert (b.answer, b.choices) == (2, ["1", "2"])
    names = sorted(p.name for p in (out / "media").iterdir())
    assert names == ["q1-0.png", "q2-0.png", "q2-1.jpg"]  # copies inside the output, stable names


def test_bad_rows_go_to_rejects_with_row_reason_and_field(media, tmp_path, capsys):
    rows = [{"prompt": "ok", "image": "pics/red.png", "answer": "red", "id": "a"},
            {"image": "pics/red.png", "answer": "red", "id": "b"},                         # 1
            {"prompt": "x", "image": "pics/missing.png", "answer": "red", "id": "c"},     # 2
            {"prompt": "x", "image": "pics/broken.png", "answer": "red", "id": "d"},      # 3
            {"prompt": "<image><image> x", "image": "pics/red.png", "answer": "r", "id": "e"},  # 4
            {"prompt": "x", "image": "pics/red.png", "id": "f"},                          # 5
            {"prompt": "x", "image": "pics/red.png", "answer": "red", "id": "a"},         # 6
            "{not json",                                                                   # 7
            {"prompt": "x", "image": "https://example.com/a.png", "answer": "red", "id": "h"},  # 8
            {"prompt": 5, "answer": "red", "id": "i"},                                      # 9
            {"prompt": "x", "image": "pics/green.png", "answer": "green", "id": "j"}]
    src = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    assert _prepare(src, "--out", out, "--media-root", media) == 0
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"], r["field"]) for r in rejects] == [
        (1, "missing_field", "prompt"), (2, "media_missing", "image"), (3, "media_decode", "image"),
        (4, "placeholder_mismatch", "prompt"), (5, "missing_answer", "answer"), (6, "duplicate_id", "id"),
        (7, "bad_json", ""), (8, "media_value", "image"), (9, "bad_value", "prompt")]
    assert rejects[1]["message"].startswith("rows.jsonl line 3, image:") and "missing.png" in rejects[1]["message"]
    assert all(r["message"].startswith(f"rows.jsonl line {r['row'] + 1}") for r in rejects)
    assert all("Fix" in r["message"] for r in rejects if r["reason"] != "media_decode")
    assert [s.id for s in load_samples([out])] == ["a", "j"]
    summary = capsys.readouterr().out
    for reason in ("missing_field", "media_decode", "duplicate_id", "bad_json"):
        assert reason in summary
    assert "rows read                11" in summary and "written                  2" in summary
    # The same rows with answers optional keep row 5.
    assert _prepare(src, "--out", tmp_path / "lax", "--media-root", media, "--allow-missing-answer") == 0
    assert [s.id for s in load_samples([tmp_path / "lax"])] == ["a", "f", "j"]


def test_all_rows_rejected_is_an_error_that_keeps_only_the_rejects(media, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}] * 3)
    out = tmp_path / "out"
    assert _prepare(src, "--out", out) == 1
    err = capsys.readouterr().err
    assert "all 3 rows were rejected" in err and "--map prompt=<column>" in err
    assert f"Every reject (row, reason, field, fix) is in {out / 'rejects.jsonl'}" in err
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"] and not list(tmp_path.glob(".out.tmp-*"))
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [(0, "missing_field"), (1, "missing_field"),
                                                          (2, "missing_field")]
    # A folder holding only a failed run's rejects is replaced by the next run (no --overwrite).
    assert _prepare(src, "--out", out, "--map", "prompt=question") == 0
    assert len(load_samples([out])) == 3


def test_csv_json_and_parquet_tables(media, tmp_path):
    rows = [{"prompt": "Name it.", "image": "pics/blue.png", "answer": "blue", "choices": '["red", "blue"]'}]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "t.json").write_text(json.dumps([dict(rows[0], choices=["red", "blue"])]))
    pq.write_table(pa.Table.from_pylist([dict(rows[0], choices=["red", "blue"])]), tmp_path / "t.parquet")
    for name in ("t.csv", "t.json", "t.parquet"):
        out = tmp_path / f"out-{name}"
        assert _prepare(tmp_path / name, "--out", out, "--media-root", media) == 0
        (s,) = load_samples([out])
        assert (s.id, s.answer, s.choices) == ("t-0", "blue", ["red", "blue"]), name
        assert _pixel(s.media()[0].image) == (0, 0, 250)


def test_llava_conversations(media, tmp_path):
    rows = [{"id": "l1", "image": "pics/red.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is this?"},
                {"from": "gpt", "value": "Red."}, {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "red"}]},
            {"id": "l2", "image": "pics/green.png", "conversations": [
                {"from": "human", "value": "No token here."}, {"from": "gpt", "value": "green"}]}]
    out = tmp_path / "out"
    assert _prepare(_write_jsonl(tmp_path / "llava.jsonl", rows), "--out", out, "--media-root", media) == 0
    a, b = load_samples([out])
    assert [m.role for m in a.messages] == ["user", "assistant", "user"] and a.answer == "red"
    assert [p.type for p in a.messages[0].content] == ["image", "text"]
    assert a.messages[0].content[1].text == "What colour is this?"
    assert b.answer == "green" and [p.type for p in b.messages[0].content] == ["image", "text"]


def test_chat_messages_three_styles(media, tmp_path):
    rows = [  # text with tokens + an images column (LLaMA-Factory style)
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>Which colour?"},
                      {"role": "assistant", "content": "blue"}], "images": ["pics/blue.png"]},
        # Hugging Face parts: {"type": "image"} slots filled from the images column
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Left or right?"},
                                                    {"type": "image"}, {"type": "image"}]}],
         "images": ["pics/red.png", "pics/green.png"], "answer": "left"},
        # unified parts with paths, and OpenAI image_url parts
        {"id": "u", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "pics/yellow.jpg"}},
            {"type": "text", "text": "Colour?"}]}], "answer": "yellow", "meta": {"k": 1}}]
    out = tmp_path / "out"
    assert _prepare(_write_jsonl(tmp_path / "chat.jsonl", rows), "--out", out, "--media-root", media) == 0
    a, b, c = load_samples([out])
    assert [m.role for m in a.messages] == ["system", "user"] and a.answer == "blue"
    assert _pixel(a.media()[0].image) == (0, 0, 250)
    assert [p.type for p in b.messages[0].content] == ["text", "image", "image"]
    assert [_pixel(p.image) for p in b.media()] == [(250, 0, 0), (0, 250, 0)]
    assert (c.id, c.answer, c.meta) == ("u", "yellow", {"k": 1}) and _pixel(c.media()[0].image) == (200, 200, 0)


def test_video_and_audio_are_decode_checked(media, tmp_path):
    av = pytest.importorskip("av")
    sf = pytest.importorskip("soundfile")
    container = av.open(str(tmp_path / "clip.mp4"), "w")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    for i in range(8):
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * i, np.uint8), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    sf.write(tmp_path / "tone.wav", np.sin(np.linspace(0, 300, 8000)).astype("float32"), 8000)
    (tmp_path / "notes.txt").write_text("not media")
    rows = [{"id": "v", "prompt": "<video> moving?", "video": "clip.mp4", "answer": "yes"},
            {"id": "a", "prompt": "<audio> pitch?", "audio": "tone.wav", "answer": "high"},
            {"id": "v-bad", "prompt": "<video> x", "video": "notes.txt", "answer": "no"},
            {"id": "a-is-video", "prompt": "<audio> x", "audio": "clip.mp4", "answer": "no"},
            {"id": "v-is-audio", "prompt": "<video> x", "video": "tone.wav", "answer": "no"}]
    out = tmp_path / "out"
    assert _prepare(_write_jsonl(tmp_path / "av.jsonl", rows), "--out", out) == 0
    v, a = load_samples([out])
    assert [p.type for p in v.messages[0].content] == ["video", "text"] and v.media()[0].video.endswith("v-0.mp4")
    assert [p.type for p in a.messages[0].content] == ["audio", "text"] and a.media()[0].audio.endswith("a-0.wav")
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"], r["field"]) for r in rejects] == [
        ("v-bad", "media_decode", "video"), ("a-is-video", "media_decode", "audio"),
        ("v-is-audio", "media_decode", "video")]


def test_save_to_disk_folder_with_fields(media, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"q": f"Q{i}", "a": str(i), "img": "pics/red.png"} for i in range(3)])
    ds.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    assert _prepare(tmp_path / "saved", "--out", out, "--map", "prompt=q", "--map", "answer=a",
                    "--map", "image=img", "--media-root", media, "--limit", "2") == 0
    assert [s.answer for s in load_samples([out])] == ["0", "1"]


def _rows_source(media: Path, tmp_path: Path, n: int = 40) -> Path:
    colours = ["pics/red.png", "pics/green.png", "pics/blue.png", "pics/yellow.jpg", "pics/broken.png"]
    rows = [{"prompt": f"Row {i}: which colour?", "image": colours[i % 5], "answer": str(i), "id": f"r/{i}"}
            for i in range(n)]
    return _write_jsonl(tmp_path / "rows.jsonl", rows)


def test_same_input_gives_byte_identical_output_with_any_worker_count(media, tmp_path):
    src = _rows_source(media, tmp_path)
    args = ["--media-root", media, "--shard-size", "7"]
    assert _prepare(src, "--out", tmp_path / "a", *args) == 0
    assert _prepare(src, "--out", tmp_path / "b", *args) == 0
    assert _prepare(src, "--out", tmp_path / "c", *args, "--num-workers", "2") == 0
    a = _tree(tmp_path / "a")
    assert a == _tree(tmp_path / "b") == _tree(tmp_path / "c")
    assert sorted(k for k in a if k.startswith("shard-")) == [f"shard-0000{i}.jsonl" for i in range(5)]
    manifest = json.loads(a["manifest.json"])
    assert manifest["counts"]["written"] == 32 and manifest["counts"]["rejected_by_reason"] == {"media_decode": 8}
    assert [s["count"] for s in manifest["shards"]] == [7, 7, 7, 7, 4]
    # ids with unsafe characters get a file name that cannot collide with another id's
    assert any(k.startswith("media/r_0-") and k.endswith("-0.png") for k in a)


def test_existing_output_is_left_untouched_without_overwrite(media, tmp_path, capsys):
    src = _rows_source(media, tmp_path, n=5)
    out = tmp_path / "out"
    assert _prepare(src, "--out", out, "--media-root", media) == 0
    before = _tree(out)
    assert _prepare(src, "--out", out, "--media-root", media, "--limit", "2") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _tree(out) == before
    # A failing run with --overwrite leaves it intact too; a good one replaces it.
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"nothing": 1}])
    assert _prepare(bad, "--out", out, "--overwrite") == 1
    assert _tree(out) == before
    beside = tmp_path / "out.rejects.jsonl"  # the failed run's rejects, next to the kept output
    assert str(beside) in capsys.readouterr().err
    assert json.loads(beside.read_text())["reason"] == "missing_field"
    assert _prepare(src, "--out", out, "--media-root", media, "--limit", "2", "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["read"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_killed_run_leaves_no_manifest_and_a_rerun_starts_clean(media, tmp_path):
    src = _rows_source(media, tmp_path, n=100_000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lightrft_mm.prepare", str(src), "--out", str(out),
           "--media-root", str(media), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob(".out.tmp-*/media/*")):
            time.sleep(0.05)
        assert list(tmp_path.glob(".out.tmp-*/media/*")), "the run never started writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    assert leftovers and not list(tmp_path.rglob("manifest.json"))
    assert _prepare(src, "--out", out, "--media-root", media, "--limit", "3") == 0
    assert not leftovers[0].exists() and len(load_samples([out])) == 3


def test_model_gives_a_prompt_token_histogram(tmp_path, capsys):
    out = tmp_path / "out"
    assert _prepare("synthetic:geo3k_like", "--out", out, "--n", "6", "--model", "tiny:qwen2_5_vl") == 0
    printed = capsys.readouterr().out
    assert "prompt tokens (tiny:qwen2_5_vl): min" in printed and "#" in printed
    stats = json.loads((out / "manifest.json").read_text())["prompt_tokens"]
    assert stats["count"] == 6 and 0 < stats["min"] <= stats["p50"] <= stats["max"]


def test_bad_model_fails_before_any_work(tmp_path, capsys):
    assert _prepare("synthetic:colors", "--out", tmp_path / "o", "--n", "2", "--model", tmp_path / "nope") == 1
    assert "not a model folder" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (["--map", "promt=q"], "unknown target 'promt'"),
    (["--limit", "0"], "--limit must be >= 1"),
])
def test_option_errors(media, tmp_path, capsys, args, needle):
    src = _rows_source(media, tmp_path, n=2)
    assert _prepare(src, "--out", tmp_path / "o", *args) == 1
    assert needle in capsys.readouterr().err


def test_unknown_source_lists_the_forms(tmp_path, capsys):
    assert _prepare("hub:colors", "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "synthetic:colors" in err and "geo3k --src" in err and ".jsonl" in err


def test_cli_prepare_and_module_agree(tmp_path):
    assert cli_main(["prepare", "synthetic:colors", "--out", str(tmp_path / "a"), "--n", "4", "--no-progress"]) == 0
    assert main(["synthetic:colors", "--out", str(tmp_path / "b"), "--n", "4", "--no-progress"]) == 0
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    pixels = np.asarray(Image.open(tmp_path / "a" / "media" / "colors-0-0.png"))
    assert pixels.shape == (84, 84, 3)

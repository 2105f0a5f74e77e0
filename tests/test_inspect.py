"""`lightrft-mm data inspect DIR [--sheet out.png]`: stats, samples and the contact sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lightrft_mm.cli import main
from lightrft_mm.prepare import prepare_synthetic
from lightrft_mm.schema import Sample, write_jsonl


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "geo"
    prepare_synthetic("geo3k_like", out, n=6, seed=4)
    (out / "rejects.jsonl").write_text(json.dumps({"row": 9, "reason": "media_decode"}) + "\n")
    return out


def test_inspect_prints_stats_and_samples(geo, capsys):
    assert main(["data", "inspect", str(geo), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[1:8] if line.startswith("  ")}
    assert lines["samples"] == "6" and lines["sources"] == "synthetic:geo3k_like=6"
    assert lines["media"] == "image=6" and lines["missing_media"] == "0"
    assert int(lines["media_bytes"]) == sum(p.stat().st_size for p in (geo / "media").iterdir())
    assert "with_answer        6" in out and "with_choices       6" in out and "media_decode=1" in out
    assert out.count("--- geo3k_like-4-") == 2 and "Find" in out and "answer: '" in out


def test_inspect_sheet_draws_images_prompts_and_answers(geo, tmp_path, capsys):
    sheet = tmp_path / "sheets" / "geo.png"
    assert main(["data", "inspect", str(geo), "--sheet", str(sheet)]) == 0
    assert f"sheet: {sheet}" in capsys.readouterr().out
    with Image.open(sheet) as im:
        pixels = np.asarray(im.convert("L"))
    cell_w, cell_h = 192 + 16, 192 + 16 + 7 * 15
    assert pixels.shape == (2 * cell_h, 4 * cell_w)  # 6 samples: 4 columns, 2 rows
    for k in range(6):
        x, y = (k % 4) * cell_w + 8, (k // 4) * cell_h + 8
        assert (pixels[y:y + 192, x:x + 192] < 128).any(), f"no diagram in cell {k}"
        assert (pixels[y + 196:y + cell_h - 8, x:x + 192] < 128).sum() > 200, f"no text under cell {k}"
    assert (pixels[cell_h + 8:, 2 * cell_w:] == 255).all()  # two empty cells


def test_inspect_text_only_and_missing_media(tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    write_jsonl([Sample.from_dict({"id": "t", "messages": [{"role": "user", "content": "Hi"}]}),
                 Sample.from_dict({"id": "m", "messages": [{"role": "user", "content": [
                     {"type": "image", "image": "media/gone.png"}, {"type": "text", "text": "x"}]}]})],
                folder / "shard-00000.jsonl")
    assert main(["data", "inspect", str(folder), "--sheet", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "missing_media      1" in out and "no manifest.json" in out
    assert (tmp_path / "s.png").stat().st_size > 0


def test_inspect_missing_folder_is_an_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 1
    assert "no such shard folder" in capsys.readouterr().err

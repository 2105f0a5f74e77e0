"""`lightrft-mm view`: the static trajectory page, checked as HTML and in a real headless Chromium."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightrft_mm.errors import DataError
from lightrft_mm.view import build_view, read_trajectories

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
EVIL = "<script>window.__pwned = 1</script><b>bold?</b>"


def _image(path, colour, size=(48, 32)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def _completion(text, reward, rewards, advantage):
    tokens = [text[i:i + 3] for i in range(0, len(text), 3)] or []
    return {"text": text, "tokens": tokens, "logps": [-0.1 * (i + 1) for i in range(len(tokens))],
            "entropy": [0.3 * i for i in range(len(tokens))], "reward": reward, "rewards": rewards,
            "advantage": advantage}


def make_run(root: Path, big_media: bool = False) -> Path:
    """A run folder with two saved steps, two sources (colors: images, speech: a wav), a summary, curves."""
    run = root / "run"
    (run / "trajectories").mkdir(parents=True)
    media = root / "media"
    media.mkdir()
    red, blue = _image(media / "red.png", (220, 20, 20)), _image(media / "blue.png", (20, 40, 220))
    wav = media / "tone.wav"
    try:
        import soundfile

        soundfile.write(wav, (0.2 * np.sin(np.linspace(0, 440 * 2 * np.pi, 8000))).astype("float32"), 8000)
    except ImportError:
        wav = None
    big = None
    if big_media:  # noise does not compress: a PNG over the copy limit
        big = media / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(big)
    for step in (2, 4):
        lines = []
        for group, (source, item) in enumerate([("colors", {"type": "image", "path": red if step == 2 else blue}),
                                                ("speech", {"type": "audio", "path": str(wav)} if wav else None)]):
            media_list = [item] if item else []
            if big and source == "colors":
                media_list.append({"type": "image", "path": str(big)})
            answer = "red" if step == 2 else "blue"
            lines.append({
                "step": step, "group": group, "sample_id": f"{source}-{step}-{group}", "source": source,
                "prompt": f"What colour is this? (step {step})", "media": media_list, "answer": answer,
                "completions": [
                    _completion(f"The answer is \\boxed{{{answer}}} at step {step}", 1.0 + step / 10,
                                {"exact_match": 1.0, "boxed_format": step / 10}, 0.707),
                    _completion(EVIL if group == 0 else "green\x1f maybe", -0.5,
                                {"exact_match": 0.0, "boxed_format": None}, -0.707),
                ]})
        (run / "trajectories" / f"step-{step:06d}.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    (run / "summary.json").write_text(json.dumps({"before": 0.125, "after": 0.875, "heldout": 256, "steps": 4}))
    _image(run / "curves.png", (250, 250, 250), (300, 200))
    return run


def test_view_escapes_model_output_and_copies_small_media(tmp_path):
    run = make_run(tmp_path)
    index = build_view(run)
    assert index == run / "view" / "index.html"
    page = index.read_text(encoding="utf-8")
    assert "<script>window.__pwned" not in page and "<b>bold?</b>" not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "green\\x1f maybe" in page  # a control character is shown as its escape
    assert page.count("<script>") == 1  # the page's own filter script only
    copied = sorted(p.name for p in (run / "view" / "media").iterdir())
    assert len(copied) == (3 if (tmp_path / "media" / "tone.wav").exists() else 2)  # red, blue, one wav
    assert "src=\"media/" in page and str(tmp_path / "media") not in page.replace("figcaption", "")
    assert (run / "view" / "curves.png").is_file()
    for number in ("1.2", "1.4", "-0.5", "+0.707", "-0.707", "0.875"):
        assert number in page
    assert "boxed_format" in page and "exact_match" in page
    assert [g["step"] for g in read_trajectories(run)] == [2, 2, 4, 4]
    assert [g["step"] for g in read_trajectories(run, last=1)] == [4, 4]


def test_view_links_large_media_instead_of_copying(tmp_path):
    run = make_run(tmp_path, big_media=True)
    assert (tmp_path / "media" / "big.png").stat().st_size > 2 * 1024 * 1024
    page = build_view(run, tmp_path / "elsewhere" / "v").read_text(encoding="utf-8")
    assert 'src="../../media/big.png"' in page  # relative to the view folder, once per group using it
    names = [p.name for p in (tmp_path / "elsewhere" / "v" / "media").iterdir()]
    assert not any(n.endswith("big.png") for n in names) and any(n.endswith("red.png") for n in names)


def test_media_placer_urls_missing_files_and_dedup(tmp_path):
    from lightrft_mm.view import MediaPlacer

    placer = MediaPlacer(tmp_path / "view", limit=10)
    assert placer.href("https://example.org/a.png") == "https://example.org/a.png"
    assert placer.href(str(tmp_path / "gone.png")) is None
    small = tmp_path / "a b.png"
    small.write_bytes(b"12345")
    first = placer.href(str(small))
    assert first.startswith("media/") and first.endswith("a%20b.png") and placer.href(str(small)) == first
    assert placer.copied == 1 and placer.linked == 0


def test_view_errors(tmp_path):
    with pytest.raises(DataError, match="logging.trajectories_every"):
        build_view(tmp_path)
    (tmp_path / "trajectories").mkdir()
    (tmp_path / "trajectories" / "step-000001.jsonl").write_text('{"step": 1}\n{"step": 1, "completions": []}\n')
    with pytest.raises(DataError, match=r"step-000001.jsonl:1: .*'completions'"):
        build_view(tmp_path)
    (tmp_path / "trajectories" / "step-000001.jsonl").write_text('{"step": 1, "completions": []}\n{"step": 1, "co')
    assert len(read_trajectories(tmp_path)) == 1  # the line being written is left for next time


def test_view_cli(tmp_path, capsys):
    from lightrft_mm.cli import main

    run = make_run(tmp_path)
    assert main(["view", str(run), "--out", str(tmp_path / "v")]) == 0
    assert "index.html" in capsys.readouterr().out and (tmp_path / "v" / "index.html").is_file()
    assert main(["view", str(tmp_path / "media")]) == 1
    assert "logging.trajectories_every" in capsys.readouterr().err


def _browser():
    """A headless Chromium driver, or a skip; with LIGHTRFT_MM_REQUIRE_BROWSER=1 a failure instead."""
    required = os.environ.get("LIGHTRFT_MM_REQUIRE_BROWSER") == "1"
    why = None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        why = "selenium is not installed (pip install -e '.[dev]')"
    if why is None and not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        why = f"no {CHROMIUM} / {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
    if why:
        if required:
            pytest.fail(f"LIGHTRFT_MM_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_view_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    index = build_view(make_run(tmp_path))
    started = time.monotonic()
    driver = _browser()
    try:
        driver.get(index.resolve().as_uri())
        deadline = time.monotonic() + 5
        images = driver.find_elements(By.CSS_SELECTOR, "main img")
        assert len(images) == 2
        for image in images:  # lazy images load once scrolled to
            driver.execute_script("arguments[0].scrollIntoView()", image)
        while time.monotonic() < deadline and not all(
                driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in images):
            time.sleep(0.05)
        assert [driver.execute_script("return arguments[0].naturalWidth", i) for i in images] == [48, 48]
        driver.execute_script("window.scrollTo(0, 0)")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert driver.execute_script("return window.__pwned") is None  # the completion's script never ran
        assert EVIL in body  # shown as text
        assert "The answer is \\boxed{red} at step 2" in body and "The answer is \\boxed{blue} at step 4" in body
        for number in ("1.2", "1.4", "-0.5", "+0.707", "-0.707"):
            assert number in body
        assert "0.875" in driver.find_element(By.ID, "summary").text
        tokens = driver.find_elements(By.CSS_SELECTOR, ".tok")
        assert tokens and "log-prob" in tokens[0].get_attribute("title")
        if (tmp_path / "media" / "tone.wav").exists():
            audio = driver.find_element(By.CSS_SELECTOR, "main audio")
            assert audio.is_displayed()
        driver.save_screenshot(str(tmp_path / "view.png"))
        try:
            driver.save_screenshot("/tmp/view-screenshot.png")
        except OSError:
            pass

        groups = driver.find_elements(By.CSS_SELECTOR, "section.group")
        assert len(groups) == 4 and all(g.is_displayed() for g in groups)
        Select(driver.find_element(By.ID, "f-step")).select_by_value("4")
        assert [g.get_attribute("data-step") for g in groups if g.is_displayed()] == ["4", "4"]
        Select(driver.find_element(By.ID, "f-source")).select_by_value("colors")
        shown = [g for g in groups if g.is_displayed()]
        assert [(g.get_attribute("data-step"), g.get_attribute("data-source")) for g in shown] == [("4", "colors")]
        assert "showing 1 of 4 groups" in driver.find_element(By.ID, "f-count").text
        Select(driver.find_element(By.ID, "f-step")).select_by_value("")
        Select(driver.find_element(By.ID, "f-source")).select_by_value("")
        driver.find_element(By.ID, "f-min").send_keys("1")  # hides the -0.5 completions, keeps every group
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.completion")
        assert sum(r.is_displayed() for r in rows) == 4 and all(g.is_displayed() for g in groups)
        driver.find_element(By.ID, "f-min").send_keys(".3")  # reward >= 1.3: only step 4's best
        assert [g.get_attribute("data-step") for g in groups if g.is_displayed()] == ["4", "4"]
    finally:
        driver.quit()
    assert time.monotonic() - started < 20


def test_missing_browser_fails_when_required(monkeypatch):
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("LIGHTRFT_MM_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="LIGHTRFT_MM_REQUIRE_BROWSER=1 but no /nonexistent/chromium"):
        _browser()
    monkeypatch.delenv("LIGHTRFT_MM_REQUIRE_BROWSER")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        _browser()

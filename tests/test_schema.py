"""Tests of the unified sample schema: validation, round trips, media paths and JSONL I/O."""

import copy
import json
import os

import pytest

from lightrft_mm.errors import DataError
from lightrft_mm.schema import Message, Part, Sample, read_jsonl, resolve_media, write_jsonl

DESIGN_EXAMPLE = {
    "id": "geo3k-train-17",
    "source": "geo3k",
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "..."}]},
        {"role": "user", "content": [{"type": "image", "image": "media/geo3k-train-17-0.png"},
                                     {"type": "text", "text": "Find x."}]},
    ],
    "answer": "48",
    "choices": ["24", "36", "48", "60"],
    "meta": {"split": "train"},
}

MULTIMEDIA = {
    "id": "av-1",
    "messages": [
        {"role": "user", "content": [
            {"type": "video", "video": "clips/a.mp4", "fps": 2.0, "max_frames": 16, "start": 1.5,
             "end": 4},
            {"type": "audio", "audio": "/data/b.wav", "start": 0, "end": 2.5},
            {"type": "image", "image": "https://example.com/c.png"},
            {"type": "image", "image": "data:image/png;base64,AAAA"},
            {"type": "text", "text": "What happens?"},
        ]},
        {"role": "assistant", "content": "A dog barks."},
        {"role": "user", "content": [{"type": "image", "image": "d.jpg"}, {"type": "text", "text": "And here?"}]},
    ],
    "answer": {"label": 3},
}


PART = "messages[0].content[0]"


def _one_part(part):
    """A row whose only message holds one part."""
    return {"id": "a", "messages": [{"role": "user", "content": [part]}]}


def _problems(message):
    return [line for line in message.splitlines() if line.startswith("  - ")]


def test_design_example_round_trip():
    sample = Sample.from_dict(copy.deepcopy(DESIGN_EXAMPLE))
    assert sample.id == "geo3k-train-17" and sample.source == "geo3k"
    assert sample.messages[1].content[0] == Part(type="image", image="media/geo3k-train-17-0.png")
    assert sample.answer == "48" and sample.choices == ["24", "36", "48", "60"]
    assert sample.meta == {"split": "train"}
    assert sample.to_dict() == DESIGN_EXAMPLE
    assert Sample.from_dict(sample.to_dict()) == sample


def test_multimedia_round_trip_and_defaults():
    sample = Sample.from_dict(copy.deepcopy(MULTIMEDIA))
    assert sample.source == "default" and sample.choices is None and sample.meta == {}
    video = sample.media("video")[0]
    assert (video.fps, video.max_frames, video.start, video.end) == (2.0, 16, 1.5, 4)
    out = sample.to_dict()
    assert "choices" not in out
    assert out["messages"][0]["content"][1] == {"type": "audio", "audio": "/data/b.wav", "start": 0,
                                                "end": 2.5}
    assert Sample.from_dict(out) == sample


def test_none_fields_are_absent():
    row = {"id": "x", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "image": None, "fps": None}]}], "answer": None, "meta": None}
    sample = Sample.from_dict(row)
    assert sample.messages[0].content[0] == Part(type="text", text="hi")
    assert sample.to_dict() == {"id": "x", "source": "default", "meta": {},
                                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


def test_plain_string_content():
    sample = Sample.from_dict({"id": "s", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"}]})
    assert sample.messages[1] == Message(role="user", content=[Part(type="text", text="What is 2+2?")])
    assert sample.to_dict()["messages"][0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert sample.prompt_text() == "What is 2+2?"


def test_media_and_prompt_text():
    sample = Sample.from_dict(copy.deepcopy(MULTIMEDIA))
    assert [p.type for p in sample.media()] == ["video", "audio", "image", "image", "image"]
    assert [p.image for p in sample.media("image")] == [
        "https://example.com/c.png", "data:image/png;base64,AAAA", "d.jpg"]
    assert sample.media("audio")[0].path == "/data/b.wav"
    assert sample.prompt_text() == "What happens?\nAnd here?"  # user turns only
    with pytest.raises(ValueError, match="media kind"):
        sample.media("text")


def test_three_mistakes_all_reported_with_where():
    row = copy.deepcopy(DESIGN_EXAMPLE)
    row["messages"][0]["role"] = "System!"                       # 1: bad role
    row["messages"][1]["content"][0]["type"] = "img"             # 2: bad part type
    row["anwser"] = row.pop("answer")                            # 3: unknown key
    with pytest.raises(DataError) as info:
        Sample.from_dict(row, where="data/train/shard-0.jsonl row 17")
    message = str(info.value)
    assert message.startswith("data/train/shard-0.jsonl row 17: sample 'geo3k-train-17' has 3 problems")
    problems = _problems(message)
    assert len(problems) == 3, message
    assert any(p.startswith("  - messages[0].role: got 'System!'; use one of system, user, assistant")
               for p in problems)
    assert any(p.startswith("  - messages[1].content[0].type: got 'img'") and "did you mean 'image'" in p
               for p in problems)
    assert any(p.startswith("  - anwser: unknown key") and "did you mean 'answer'" in p for p in problems)


USER_X = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("row, path, words", [
    ({"messages": USER_X}, "id: missing", "string id"),
    ({"id": 17, "messages": USER_X}, "id: got 17", "string id"),
    ({"id": "a", "messages": []}, "messages: got []", "non-empty list"),
    ({"id": "a"}, "messages: missing", "non-empty list"),
    ({"id": "a", "messages": ["hello"]}, "messages[0]: got 'hello'", "'role' and 'content'"),
    ({"id": "a", "messages": [{"content": "x"}]}, "messages[0].role: missing", "use one of"),
    ({"id": "a", "messages": [{"role": "user"}]}, "messages[0].content: missing", "list of parts"),
    ({"id": "a", "messages": [{"role": "user", "content": []}]}, "messages[0].content: got []",
     "non-empty"),
    ({"id": "a", "messages": [{"role": "user", "content": "x", "name": "bob"}]},
     "messages[0].name: unknown key", "known keys: role, content"),
    ({"id": "a", "messages": [{"role": "user", "content": ["hello"]}]}, f"{PART}: got 'hello'",
     "a part is an object"),
    (_one_part({"text": "x"}), f"{PART}.type: missing", "here \"type\": 'text'"),
    (_one_part({"type": "text", "text": "x", "txt": "x"}), f"{PART}.txt: unknown key",
     "did you mean 'text'"),
    (_one_part({"type": "text", "text": 5}), f"{PART}.text: got 5", "under the key 'text'"),
    (_one_part({"type": "image"}), f"{PART}.image: missing", "under the key 'image'"),
    (_one_part({"type": "image", "image": ""}), f"{PART}.image: got ''", "path"),
    (_one_part({"type": "image", "image": "a", "text": "b"}), f"{PART}.text: got 'b'", "own part"),
    (_one_part({"type": "image", "image": "a", "fps": 2}), f"{PART}.fps: got 2", "only video parts"),
    (_one_part({"type": "audio", "audio": "a", "max_frames": 2}), f"{PART}.max_frames: got 2",
     "only video parts"),
    (_one_part({"type": "image", "image": "a", "start": 1}), f"{PART}.start: got 1",
     "only video and audio parts"),
    (_one_part({"type": "video", "video": "a", "fps": "2"}), f"{PART}.fps: got '2'", "> 0"),
    (_one_part({"type": "video", "video": "a", "max_frames": 1.5}), f"{PART}.max_frames: got 1.5",
     "whole number"),
    (_one_part({"type": "video", "video": "a", "max_frames": True}), f"{PART}.max_frames: got True",
     "whole number"),
    (_one_part({"type": "audio", "audio": "a", "start": 3, "end": 2}),
     f"{PART}.start: got start=3 >= end=2", "make start < end"),
    (_one_part({"type": "audio", "audio": "a", "end": -1}), f"{PART}.end: got -1", ">= 0"),
    ({"id": "a", "source": "", "messages": USER_X}, "source: got ''", "non-empty"),
    ({"id": "a", "messages": USER_X, "choices": "AB"}, "choices: got 'AB'", "list"),
    ({"id": "a", "messages": USER_X, "meta": [1]}, "meta: got [1]", "object"),
])
def test_each_rule(row, path, words):
    with pytest.raises(DataError) as info:
        Sample.from_dict(row, where="f.jsonl row 3")
    message = str(info.value)
    assert message.startswith("f.jsonl row 3: ")
    problems = _problems(message)
    assert len(problems) == 1, message
    assert problems[0].startswith(f"  - {path}") and words in problems[0], message


def test_misspelled_key_also_reports_the_missing_one():
    row = {"id": "a", "messages": [{"role": "user", "content": [{"type": "text", "txt": "x"}]}]}
    with pytest.raises(DataError) as info:
        Sample.from_dict(row)
    problems = _problems(str(info.value))
    assert str(info.value).startswith("sample 'a' has 2 problems:")
    assert problems[0].startswith("  - messages[0].content[0].txt: unknown key 'txt'; did you mean 'text'?")
    assert problems[1].startswith("  - messages[0].content[0].text: missing")


def test_row_that_is_not_an_object():
    with pytest.raises(DataError, match=r"^r 1: a sample must be a JSON object, got list"):
        Sample.from_dict([1, 2], where="r 1")


def test_no_assert_in_validation():
    """Validation must hold under ``python -O`` too, so it never relies on assert."""
    import inspect

    import lightrft_mm.schema as schema

    assert "assert " not in inspect.getsource(schema)


def test_resolve_media(tmp_path):
    sample = Sample.from_dict(copy.deepcopy(MULTIMEDIA))
    resolved = resolve_media(sample, tmp_path)
    paths = [p.path for p in resolved.media()]
    assert paths == [str(tmp_path / "clips" / "a.mp4"), "/data/b.wav", "https://example.com/c.png",
                     "data:image/png;base64,AAAA", str(tmp_path / "d.jpg")]
    assert resolved.media("video")[0].fps == 2.0  # other fields are kept
    assert sample.media("video")[0].video == "clips/a.mp4"  # the original is untouched
    assert resolved.id == sample.id and resolved.answer == sample.answer


def test_resolve_media_relative_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample = Sample.from_dict(copy.deepcopy(DESIGN_EXAMPLE))
    path = resolve_media(sample, "shards").media()[0].path
    assert os.path.isabs(path) and path == str(tmp_path / "shards" / "media" / "geo3k-train-17-0.png")


def test_write_then_read_jsonl(tmp_path):
    samples = [Sample.from_dict(copy.deepcopy(DESIGN_EXAMPLE)), Sample.from_dict(copy.deepcopy(MULTIMEDIA))]
    samples[0].meta["note"] = "naïve ✓"
    path = tmp_path / "out" / "shard-0.jsonl"
    assert write_jsonl(samples, path) == 2
    assert list(read_jsonl(path)) == samples
    assert sorted(os.listdir(path.parent)) == ["shard-0.jsonl"]  # no temp file left
    assert "naïve ✓" in path.read_text(encoding="utf-8")


def test_write_replaces_existing_file(tmp_path):
    path = tmp_path / "shard.jsonl"
    path.write_text("old\n")
    write_jsonl([Sample.from_dict(copy.deepcopy(DESIGN_EXAMPLE))], path)
    assert [s.id for s in read_jsonl(path)] == ["geo3k-train-17"]
    assert os.listdir(tmp_path) == ["shard.jsonl"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "shard.jsonl"
    path.write_text("old\n")
    good = Sample.from_dict(copy.deepcopy(DESIGN_EXAMPLE))
    bad = Sample(id="bad", messages=good.messages, meta={"x": object()})
    with pytest.raises(DataError, match=r"shard\.jsonl: sample 'bad' cannot be written as JSON"):
        write_jsonl([good, bad], path)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["shard.jsonl"]

    def exploding():
        yield good
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        write_jsonl(exploding(), path)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["shard.jsonl"]


def test_read_jsonl_skips_blank_lines_and_numbers_rows_by_line(tmp_path):
    path = tmp_path / "s.jsonl"
    good = json.dumps(DESIGN_EXAMPLE)
    bad = json.dumps({"id": "b", "messages": [{"role": "robot", "content": "x"}]})
    path.write_text(f"\n{good}\n   \n{bad}\n", encoding="utf-8")
    rows = read_jsonl(path)
    assert next(rows).id == "geo3k-train-17"
    with pytest.raises(DataError) as info:
        next(rows)
    message = str(info.value)
    assert message.startswith(f"{path} row 4: sample 'b' has 1 problem:")
    assert "messages[0].role: got 'robot'" in message


def test_read_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(DESIGN_EXAMPLE) + "\n{\"id\": \"x\",,}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    assert str(info.value).startswith(f"{path} line 2: not valid JSON")
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such shard file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_read_jsonl_with_bom(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(DESIGN_EXAMPLE).encode())
    assert [s.id for s in read_jsonl(path)] == ["geo3k-train-17"]

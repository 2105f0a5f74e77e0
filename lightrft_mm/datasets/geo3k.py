"""Geo3K (`hiyouga/geometry3k`) rows -> unified Samples.

The dataset's columns: ``images`` (a list of images stored as ``{bytes, path}``), ``problem``
(text with one ``<image>`` placeholder per image), ``answer`` (the value of the correct choice,
e.g. ``"48"``) and, in some copies, ``id``, ``choices`` (list of strings) and ``ground_truth``.
Splits: train / validation / test with 2101 / 300 / 601 rows.

Each image is placed where its placeholder stood; the instruction (``--instruction``) follows
the problem in the same user turn; ``answer`` and ``choices`` are kept; ``meta`` holds the
split, the row number and ``ground_truth`` when present.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightrft_mm.datasets.convert import Converted, Reject, choices_of, media_of, place_media, text_of
from lightrft_mm.datasets.media import MediaItem
from lightrft_mm.datasets.readers import RawRow

SOURCE = "geo3k"
SPLITS = ("train", "validation", "test")
DEFAULT_INSTRUCTION = ("Think through the problem step by step inside <think></think>, then give "
                       "the final answer in \\boxed{}.")
DOWNLOAD_HINT = ("huggingface-cli download hiyouga/geometry3k --repo-type dataset "
                 "--local-dir data/geometry3k")


def build_messages(problem: str, items: list[MediaItem], media: list[MediaItem], instruction: str,
                   *, where: str = "problem") -> list[dict]:
    """The user turn of a Geo3K problem: images at their placeholders, then the instruction.

    Raises:
        Reject: ``placeholder_mismatch`` when the ``<image>`` count differs from the images.
    """
    content = place_media(problem, items, media, where=where, auto=False)
    if instruction:
        if content and content[-1]["type"] == "text":
            content[-1] = {"type": "text", "text": f"{content[-1]['text']}\n{instruction}"}
        else:
            content.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": content}]


@dataclass
class Geo3KConverter:
    """One Geo3K row -> a unified sample dict; picklable for worker processes."""

    split: str = "train"
    instruction: str = DEFAULT_INSTRUCTION

    def __call__(self, raw: RawRow) -> Converted:
        row = raw.data
        problem = text_of(row.get("problem"), "problem", required=True)
        items = media_of(row.get("images"), "image", "images", None)
        if not items:
            raise Reject("missing_field", "images", "images: the row has no image. Fix: Geo3K rows "
                         "hold one diagram per <image>; drop the row or restore its image.")
        media: list[MediaItem] = []
        messages = build_messages(problem, items, media, self.instruction)
        answer = row.get("answer")
        if isinstance(answer, str):
            answer = answer.strip()
        own_id = row.get("id")
        meta = {"split": self.split, "row": raw.index}
        if row.get("ground_truth") is not None:
            meta["ground_truth"] = row["ground_truth"]
        out = {"id": f"{SOURCE}-{self.split}-{own_id if own_id not in (None, '') else raw.index}",
               "source": SOURCE, "messages": messages, "meta": meta}
        if answer not in (None, ""):
            out["answer"] = answer
        choices = choices_of(row.get("choices"), "choices")
        if choices is not None:
            out["choices"] = choices
        return Converted(out, media)

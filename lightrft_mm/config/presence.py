"""What `validate` says about the files a valid config needs but a fresh clone lacks.

A recipe may name a Hub model that is not downloaded yet, a colocated vLLM engine whose
environment is not installed yet, and data folders its launch command (the first line,
`# Launch: ...`) prepares: these are reported as notes, not problems, so that every recipe
validates on a fresh clone (`train` requires the first two before loading anything). A data
folder that exists is read in full (every row against the schema, media paths inside the
folder), as training would; a missing folder that
neither the launch command prepares nor `data.synthetic` generates is a problem.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from lightrft_mm.errors import ConfigError, DataError, MediaError, RolloutError

LAUNCH = "# Launch:"


def launch_command(path: str | Path) -> str:
    """The launch command of a recipe's first line (`# Launch: ...`), or "" when it has none."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return first[len(LAUNCH):].strip() if first.startswith(LAUNCH) else ""


def prepare_commands(launch: str) -> dict[str, str]:
    """Output folder (normalised) -> the `prepare` command of `launch` that writes it."""
    found = {}
    for part in launch.split("&&"):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        if "prepare" not in words and "lightrft_mm.prepare" not in words:
            continue
        for i, word in enumerate(words[:-1]):
            if word == "--out":
                found[os.path.normpath(words[i + 1])] = part.strip()
        found.update({os.path.normpath(w[len("--out="):]): part.strip() for w in words if w.startswith("--out=")})
    return found


def presence_notes(cfg, path: str | Path | None = None) -> list[str]:
    """Notes about what is not there yet (Hub model, data the launch command prepares).

    Args:
        cfg: A Config that passed `load_config`.
        path: The recipe it came from (its launch command is read), or None.

    Returns:
        One line per thing still missing, e.g. "data.train[0] data/geo3k/train: not prepared yet: <command>".

    Raises:
        ConfigError: Listing every data folder that is missing with nothing to prepare it, and
            every existing one that training could not read.
    """
    from lightrft_mm.models.hub import describe, is_hub_id

    notes, problems = [], []
    if is_hub_id(cfg.model.name_or_path):
        notes.append(describe(cfg.model.name_or_path, cfg.model.revision or None))
    if cfg.rollout.engine == "vllm" and cfg.rollout.vllm.mode == "colocate":
        from lightrft_mm.rollout.vllm import vllm_python

        try:
            vllm_python(cfg.rollout.vllm.python)  # one named but missing is a config problem already
        except RolloutError as e:
            why = str(e).removeprefix("rollout.engine=vllm: ")
            notes.append(f"rollout.engine=vllm: not installed yet; train refuses to start without it. {why}")
    prepared = prepare_commands(launch_command(path)) if path else {}
    for key, folders in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for i, folder in enumerate(folders):
            where = f"{key}[{i}]"
            if Path(folder).exists():
                problems += _read_problems(folder, where, cfg.data.allow_outside_media)
            elif cfg.data.synthetic and i == 0:
                continue  # generated at the start of training
            elif os.path.normpath(folder) in prepared:
                notes.append(f"{where} {folder}: not prepared yet: {prepared[os.path.normpath(folder)]}")
            else:
                problems.append(f"{where}: {folder!r} does not exist. Fix: prepare it (`lightrft-mm prepare SOURCE "
                                f"--out {folder}`; a recipe's `# Launch:` line that prepares it makes this a note), "
                                "or correct the path.")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{path or 'config'}: {len(problems)} problem(s):\n{lines}")
    return notes


def _read_problems(folder: str, where: str, allow_outside_media: bool) -> list[str]:
    """Why the existing data `folder` cannot be read as training would read it ([] when it can)."""
    from lightrft_mm.datasets.loader import load_samples

    try:
        samples = load_samples([folder], allow_outside_media=allow_outside_media)
    except (DataError, MediaError) as e:
        return [f"{where}: {e}"]
    return [] if samples else [f"{where}: {folder} holds no samples. Fix: prepare it again."]

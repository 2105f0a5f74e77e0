"""Model references: a local folder, `tiny:<family>`, or a Hugging Face Hub id (`org/name`).

Interface (kept stable for the trainer, `validate`, `train --dry-run`):
- `is_hub_id(name)`: the reference has the form of a Hub id and is not a local folder.
- `read_config(name, revision=None)`: the model's config.json as a dict, from the folder or the
  local Hub cache, without downloading weights; None when it is not available offline.
- `resolve(name, revision=None)`: a local folder holding the model (downloads a Hub id unless
  offline); raises ModelError saying what is missing and how to get it.

A Hub id is downloaded by `huggingface_hub` into its cache (HF_HUB_CACHE, else HF_HOME/hub), with
its progress bars; HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1 use the cached copy only. The
environment is read at each call, not when huggingface_hub was imported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from lightrft_mm.errors import ModelError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_ID = 96  # the Hub's limit on a repository id
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Files a model download skips: other frameworks' weights, and *.bin where safetensors exist.
SKIP = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf", "*.pt", "*.pth", "*.ckpt", "original/*"]
_TRUE = ("1", "on", "yes", "true")
_resolved: dict[tuple[str, str | None, str], Path] = {}  # (id, revision, cache) -> snapshot, per process


def is_hub_id(name: str) -> bool:
    """True when `name` has the form of a Hub id (`org/name`) and is no local path."""
    return (not name.startswith("tiny:") and not Path(name).exists() and bool(HUB_ID.match(name))
            and len(name) <= MAX_ID and ".." not in name and "--" not in name and not name.endswith(".git"))


def offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set: use the local cache only."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """The Hub cache huggingface_hub uses now: HF_HUB_CACHE, else HF_HOME/hub, else its default."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_command(name: str, revision: str | None = None) -> str:
    """The command that puts a Hub model into the cache (huggingface_hub's `hf` CLI)."""
    return f"hf download {name}" + (f" --revision {revision}" if revision else "")


def reference_problem(name: str, revision: str | None = None) -> str:
    """Why `name` is no usable model reference (its form only; weights may be absent), or "".

    `tiny:<family>` is checked by the config against the known families, not here.
    """
    if name.startswith("tiny:"):
        return ("model.revision: only applies to Hub ids; a tiny: model is built offline. Fix: remove it."
                if revision else "")
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            return (f"model.name_or_path: folder {name!r} has no config.json. Fix: a Hugging Face model folder "
                    "(config.json, weights, tokenizer files), a Hub id such as Qwen/Qwen2.5-VL-7B-Instruct, "
                    "or tiny:<family>.")
        return ("model.revision: only applies to Hub ids; a local folder is used as it is. Fix: remove it."
                if revision else "")
    if folder.exists():
        return f"model.name_or_path: {name!r} is a file, not a model folder. Fix: the folder holding config.json."
    if is_hub_id(name):
        return ""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        return (f"model.name_or_path: folder {name!r} does not exist. Fix: the path of a local model folder, "
                "a Hub id (ORG/NAME, e.g. Qwen/Qwen2.5-VL-7B-Instruct), or tiny:<family>.")
    return (f"model.name_or_path: {name!r} is neither a local folder nor a well-formed Hub id. A Hub id is "
            "ORG/NAME: letters, digits, '-', '_' and '.', at most 96 characters, no '--' or '..'. "
            "Fix: e.g. Qwen/Qwen2.5-VL-7B-Instruct, a local model folder, or tiny:<family>.")


def cached_file(name: str, filename: str, revision: str | None = None) -> Path | None:
    """`filename` of a local folder or of the cached Hub snapshot, without downloading; else None."""
    if not is_hub_id(name):
        path = Path(name).expanduser() / filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, filename, cache_dir=cache_dir(), revision=revision or None)
    return Path(found) if isinstance(found, str) else None


def read_config(name: str, revision: str | None = None, *, download: bool = False) -> dict | None:
    """The model's config.json as a dict, from the folder or the Hub cache; None when absent.

    Args:
        name: Local folder or Hub id (`tiny:` references have no config file: None).
        revision: Branch, tag or commit of a Hub id (None: main).
        download: Fetch config.json alone from the Hub when it is not cached and not offline.
    """
    if name.startswith("tiny:"):
        return None
    path = cached_file(name, "config.json", revision)
    if path is None and download and is_hub_id(name) and not offline():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, "config.json", revision=revision or None, cache_dir=cache_dir()))
        except Exception as e:  # noqa: BLE001 -- no network, unknown repo, gated: not known offline
            log.info("config.json of %s not fetched: %s", name, e)
            return None
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable config.json ({e}). Fix: download the model again "
                         f"({download_command(name, revision)} --force-download).") from e


def missing_files(folder: Path) -> list[str]:
    """What a model folder lacks to be loaded: config.json, weights, shards its index names."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return missing + [index.name]
        return missing + sorted(s for s in shards if not (folder / s).is_file())
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        missing.append("weights (*.safetensors)")
    return missing


def resolve(name: str, revision: str | None = None, *, progress: bool = True) -> Path:
    """A local folder holding the model `name` refers to.

    Args:
        name: Local folder (returned as it is) or Hub id (cached snapshot, downloaded when missing).
        revision: Branch, tag or commit of a Hub id (None: main).
        progress: Show huggingface_hub's download progress bars (off on ranks other than 0).

    Raises:
        ModelError: Offline without a complete cached copy, or the Hub refused or could not be
            reached; the message names the model, its revision and the command that downloads it.
    """
    if not is_hub_id(name):
        return Path(name).expanduser()
    revision = revision or None
    cache = cache_dir()
    key = (name, revision, str(cache))
    if key not in _resolved:
        folder = _local_snapshot(name, revision, cache) if offline() else _download(name, revision, cache, progress)
        missing = missing_files(folder)
        if missing:
            raise ModelError(f"model {name} ({revision or 'main'}): the cached copy in {folder} is incomplete "
                             f"(missing {', '.join(missing)}). Fix: {download_command(name, revision)}"
                             f"{' (without HF_HUB_OFFLINE=1)' if offline() else ''}.")
        _resolved[key] = folder
    return _resolved[key]


def _local_snapshot(name: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError: nothing usable cached for that revision
        flag = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE \
            else "TRANSFORMERS_OFFLINE"
        raise ModelError(f"model {name}: offline ({flag}=1) and no cached copy of {name} "
                         f"(revision {revision or 'main'}) exists in {cache}. Fix: download it first with "
                         f"`{download_command(name, revision)}` (on a machine with network, with the same "
                         "HF_HUB_CACHE / HF_HOME), or unset the offline variable to let train download it.") from e


def _download(name: str, revision: str | None, cache: Path, progress: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    where = f"model {name} (revision {revision or 'main'})"
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        files = [s.rfilename for s in HfApi().model_info(name, revision=revision).siblings or []]
        skip = SKIP + (["*.bin"] if any(f.endswith(".safetensors") for f in files) else [])
        log.info("%s: downloading into %s (the cached files are reused)", where, cache)
        return Path(snapshot_download(name, revision=revision, cache_dir=cache, ignore_patterns=skip))
    except GatedRepoError as e:
        raise ModelError(f"{where}: the repository is gated. Fix: accept its terms on huggingface.co/{name}, "
                         "then `hf auth login` (or set HF_TOKEN).") from e
    except RevisionNotFoundError as e:
        raise ModelError(f"{where}: no such revision. Fix: model.revision names a branch, tag or commit of "
                         f"huggingface.co/{name}, or remove it for main.") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"{where}: not found on the Hub (or private). Fix: check the id (ORG/NAME, e.g. "
                         "Qwen/Qwen2.5-VL-7B-Instruct); for a private model `hf auth login`"
                         f"{_folder_hint(name)}.") from e
    except Exception as e:  # noqa: BLE001 -- no network (httpx's errors are no OSError), other HTTP errors
        raise ModelError(f"{where}: could not be downloaded ({type(e).__name__}: {str(e).splitlines()[0]}). Fix: "
                         f"check the network, or download it where there is one (`{download_command(name, revision)}`) "
                         "into this HF_HUB_CACHE and set HF_HUB_OFFLINE=1.") from e
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


def describe(name: str, revision: str | None = None) -> str:
    """One line for `validate` about a Hub id: where its cached copy is, or that it is not downloaded yet."""
    where = f"{name}" + (f" (revision {revision})" if revision else "")
    config = cached_file(name, "config.json", revision)
    if config is not None and not missing_files(config.parent):
        return f"model {where}: cached in {config.parent}"
    how = (f"offline: download it before training with `{download_command(name, revision)}`" if offline()
           else f"train downloads it into {cache_dir()} (or first: `{download_command(name, revision)}`)")
    return f"model {where}: not downloaded yet; {how}{_folder_hint(name)}"


def _folder_hint(name: str) -> str:
    """For an id whose first part is a local folder (`models/X` with ./models there): it may be a path."""
    if Path(name).parent.is_dir():
        return (f". It is read as a Hub id because no local folder {Path(name).absolute()} exists; if you meant "
                "that folder, create it or fix the path")
    return ""


__all__ = ["HUB_ID", "cache_dir", "cached_file", "describe", "download_command", "is_hub_id", "missing_files",
           "offline", "read_config", "reference_problem", "resolve"]

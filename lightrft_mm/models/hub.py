"""Model references: a local folder, `tiny:<family>`, or a Hugging Face Hub id (`org/name`).

Interface (kept stable for the trainer, `validate`, `train --dry-run`):
- `is_hub_id(name)`: the reference has the form of a Hub id and is not a local folder.
- `read_config(name, revision=None)`: the model's config.json as a dict, from the folder or the
  local Hub cache, without downloading weights; None when it is not available offline.
- `resolve(name, revision=None)`: a local folder holding the model (downloads a Hub id unless
  offline); raises ModelError saying what is missing and how to get it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lightrft_mm.errors import ModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(name: str) -> bool:
    return not name.startswith("tiny:") and not Path(name).exists() and bool(HUB_ID.match(name))


def read_config(name: str, revision: str | None = None) -> dict | None:
    if Path(name, "config.json").is_file():
        return json.loads(Path(name, "config.json").read_text())
    if is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    return None


def resolve(name: str, revision: str | None = None) -> Path:
    if not is_hub_id(name):
        return Path(name)
    raise ModelError(f"model {name}: Hub ids are not resolved yet.")


__all__ = ["HUB_ID", "is_hub_id", "read_config", "resolve"]

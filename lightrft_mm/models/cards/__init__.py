"""Architecture cards: the public config.json of the models the recipes name, shipped so that
`lightrft-mm train CONFIG --dry-run` can plan a Hub model offline, with no Hugging Face cache.

A card is used only when neither a local folder nor the Hub cache has the model's config.json
(the real config.json wins once downloaded). Sources: README.md in this folder.
"""

from __future__ import annotations

import json
from pathlib import Path

CARDS = Path(__file__).parent


def card_names() -> list[str]:
    """Hub ids that have a card, e.g. `Qwen/Qwen2.5-VL-7B-Instruct`."""
    return sorted(p.stem.replace("--", "/", 1) for p in CARDS.glob("*.json"))


def find_card(name: str) -> tuple[str, dict] | None:
    """The card of `name`: a Hub id with a card, or a path whose last part is such a model's name
    (a recipe's placeholder folder, e.g. models/Qwen2.5-VL-7B-Instruct, not downloaded yet).

    Args:
        name: `model.name_or_path`.

    Returns:
        (the card's Hub id, its config dict), or None when no card matches.
    """
    wanted = name.rstrip("/")
    for hub_id in card_names():
        if wanted == hub_id or Path(wanted).name == hub_id.split("/", 1)[1]:
            return hub_id, json.loads((CARDS / f"{hub_id.replace('/', '--', 1)}.json").read_text())
    return None

"""Toy customer-support data shared by the tests (written for these tests)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = ["billing", "shipping", "refund"]
TEXTS = {
    "billing": ["my card was charged twice", "why is there an extra fee on my invoice", "update the card on my account",
                "the bill amount looks wrong", "i was billed after cancelling", "explain this charge please",
                "can i pay my invoice by transfer", "the invoice shows the wrong tax"],
    "shipping": ["where is my parcel", "the package has not arrived yet", "can you ship to norway",
                 "tracking number does not work", "delivery is late by a week", "change my delivery address",
                 "how long does shipping take", "the courier left it at the wrong door"],
    "refund": ["i want my money back", "how do i return this item", "refund has not reached my account",
               "send a refund for the broken mug", "can i get a refund after 30 days", "return label please",
               "the refund amount is too low", "cancel and refund my order"],
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_rows(per_label: int, offset: int = 0) -> list[dict[str, str]]:
    return [{"text": TEXTS[label][(i + offset) % len(TEXTS[label])], "label": label}
            for i in range(per_label) for label in LABELS]


# One small recipe section per built-in fine-tuning method (tests train each on the tiny model).
TINY_METHODS = {
    "lora": {"kind": "lora", "r": 4},
    "dora": {"kind": "dora", "r": 4},
    "qlora": {"kind": "qlora", "r": 4},
    "ia3": {"kind": "ia3"},
    "prompt_tuning": {"kind": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix_tuning": {"kind": "prefix_tuning", "num_virtual_tokens": 4},
    "full": {"kind": "full"},
}

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


# Extract: customer messages → the product named and what is wrong with it (null when the message does not say).
EXTRACT_FIELDS = {"product": "the product the customer names", "problem": "what is wrong with it"}
EXTRACT_ROWS = [
    ("my blender arrived with a cracked lid", "blender", "cracked lid"),
    ("the kettle i bought leaks from the bottom", "kettle", "leaks from the bottom"),
    ("the desk lamp flickers every few minutes", "desk lamp", "flickers every few minutes"),
    ("my new headphones have no sound in the left ear", "headphones", "no sound in the left ear"),
    ("the toaster burns one side of the bread", "toaster", "burns one side of the bread"),
    ("the office chair wobbles when i lean back", "office chair", "wobbles when i lean back"),
    ("my coffee grinder makes a loud rattling noise", "coffee grinder", "loud rattling noise"),
    ("the rice cooker shows an error light", "rice cooker", "error light"),
    ("the wall clock stopped after two days", "wall clock", "stopped after two days"),
    ("where is the vacuum cleaner i ordered", "vacuum cleaner", None),
    ("can i still return the standing fan", "standing fan", None),
    ("do you sell a spare charger for the electric toothbrush", "electric toothbrush", None),
    ("is the bread maker back in stock soon", "bread maker", None),
    ("when will the air fryer be delivered", "air fryer", None),
    ("the waffle iron sticks to every waffle", "waffle iron", "sticks to every waffle"),
    ("i want to swap the yoga mat for another colour", "yoga mat", None),
]


def extract_row(text: str, product: str, problem: str | None) -> dict[str, Any]:
    return {"text": text, "target": {"product": product, "problem": problem}}


# Generate: a customer message → a short summary of it for the agent.
GENERATE_ROWS = [
    ("hello, i ordered a blue sofa three weeks ago and it still has not arrived, the tracking page has not changed since monday",
     "blue sofa three weeks late, tracking stuck"),
    ("the blender i got yesterday has a crack in the jug and it leaks all over the counter when i use it",
     "new blender jug cracked and leaking"),
    ("i was charged twice for the same order of garden chairs and i would like one of the payments back please",
     "double charge for garden chairs, wants one refunded"),
    ("can you tell me if the winter jacket in size medium will be back in stock before december",
     "asks if medium winter jacket restocks before december"),
    ("my parcel was delivered to the wrong house and the neighbour says they never saw it",
     "parcel delivered to wrong house, missing"),
    ("i would like to change the delivery address on my order to my office instead of my home",
     "wants delivery address changed to office"),
    ("the headphones stopped charging after a week and the light does not come on at all any more",
     "headphones stopped charging after a week"),
    ("i returned the shoes a month ago but the refund has still not shown up on my card",
     "shoe refund missing a month after return"),
    ("the discount code from your email does not work at checkout, it says the code has expired",
     "email discount code rejected as expired"),
    ("please cancel my order for the bookshelf, i found a cheaper one elsewhere",
     "wants bookshelf order cancelled"),
    ("the lamp came without the bulb that the product page said was included in the box",
     "lamp delivered without promised bulb"),
    ("my subscription renewed even though i turned off auto renew last month, please stop it",
     "subscription renewed despite auto renew off"),
    ("the mattress smells strongly of chemicals even after airing it out for three days",
     "mattress chemical smell persists"),
    ("i cannot log in to my account, the reset password email never arrives",
     "cannot log in, no password reset email"),
]

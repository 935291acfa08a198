"""A scripted teacher for the tests: a real HTTP server on 127.0.0.1 speaking OpenAI chat completions.

    with FakeTeacher(good_answer) as teacher:        # teacher.url = "http://127.0.0.1:PORT/v1"
        ...                                          # teacher.hits: every request (body, headers, time)
    FakeTeacher(hold_from=5)                         # the 5th request on gets no answer until teacher.release()

An answer function gets the request body and the number of earlier hits with the same messages and
seed, and returns ``(status, headers, content)``: a string becomes the assistant message, a dict is sent
as the JSON body as is (e.g. an error object), bytes are sent raw as text/html. The toy paraphrases below were written for these tests.

``good_answer`` answers classify requests (``Label: X``), ``good_extract_answer`` extract ones (``Filled fields: a, b``:
texts with those fields filled, every value copied from its text), ``good_generate_answer`` generate ones ((text,
summary) pairs); ``*_recipe_factory`` write the matching toy recipes.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from toydata import LABELS, TEXTS, write_jsonl

Answer = tuple[int, dict[str, str], Any]

GEN = {
    "billing": ["why did you charge me two times this month", "there is a fee on my statement i do not recognise",
                "please change the credit card you bill", "my invoice total is higher than my plan",
                "i cancelled but you still took a payment", "what is this charge from last tuesday",
                "can i settle the invoice with a bank transfer", "the vat on my bill is not right",
                "i was charged for a plan i never chose", "my payment went through twice",
                "how do i update billing details", "the monthly fee went up without notice"],
    "shipping": ["my order still has not shown up", "where is the box i ordered last week", "do you deliver to iceland",
                 "the tracking link shows nothing", "the courier is a week behind", "please send it to my new address instead",
                 "how many days until my package arrives", "the parcel was left at my neighbour's door",
                 "my delivery says delivered but nothing came", "can i pick the delivery date", "is express shipping available",
                 "the package is stuck in customs"],
    "refund": ["i would like my money returned", "how can i send this item back", "my refund still is not on my card",
               "please refund the cracked plate", "is a refund possible after a month", "can you email me a return label",
               "you refunded less than i paid", "cancel my order and give me a refund",
               "i returned it two weeks ago and got nothing back", "what is your refund policy",
               "the item was faulty so i want a refund", "do i get a refund for the shipping cost too"],
}


def label_of(body: dict[str, Any]) -> str:
    return re.search(r"^Label: (.+)$", body["messages"][-1]["content"], re.MULTILINE).group(1)


def n_of(body: dict[str, Any]) -> int:
    return int(re.search(r"Write (\d+) new", body["messages"][-1]["content"]).group(1))


def examples(label: str, texts: list[str]) -> str:
    return json.dumps({"examples": [{"text": t, "label": label} for t in texts]})


def good_answer(body: dict[str, Any], _attempt: int) -> Answer:
    """Paraphrases of the asked label, picked by the request's seed (so requests overlap: duplicates happen)."""
    label, n, seed = label_of(body), n_of(body), body.get("seed", 0)
    pool = GEN[label]
    return 200, {}, examples(label, [pool[(seed * 5 + i) % len(pool)] for i in range(n)])


def completion(model: str, content: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}


class FakeTeacher:
    def __init__(self, answer: Callable[[dict[str, Any], int], Answer] = good_answer, hold_from: int | None = None):
        self.answer, self.hold_from = answer, hold_from
        self.released = threading.Event()
        self.hits: list[dict[str, Any]] = []
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeTeacher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def release(self) -> None:
        """Answer the held requests (their clients may be gone) and hold no more."""
        self.released.set()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps([body["messages"], body.get("seed")])
                with fake.lock:
                    attempt = fake.attempts[key]
                    fake.attempts[key] += 1
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    fake.hits.append({"body": body, "headers": headers, "time": time.monotonic(), "attempt": attempt})
                    held = fake.hold_from is not None and len(fake.hits) >= fake.hold_from
                if held:
                    fake.released.wait(300)
                status, headers, content = fake.answer(body, attempt)
                payload = content if isinstance(content, dict) else completion(body["model"], content)
                if status >= 400 and not isinstance(content, dict):
                    payload = {"error": {"message": str(content), "type": "server_error"}}
                raw = isinstance(content, bytes)  # bytes go out as they are: a server that is not an OpenAI API
                data = content if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # a held request's client was killed meanwhile
                    pass

        return Handler


def synth_recipe_factory(make_recipe: Callable[..., Path], model_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """``make(url, **synth)``: a toy recipe (6 real rows per label in train, 2 in test) whose synth section asks ``url``."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": TEXTS[lb][i], "label": lb} for i in range(6) for lb in LABELS])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": TEXTS[lb][i], "label": lb} for i in (6, 7) for lb in LABELS])

    def make(url: str, **synth: Any) -> Path:
        teacher = {"base_url": url, "model": "fake-teacher", "concurrency": 4, "max_attempts": 3, **synth.pop("teacher", {})}
        section = {"per_label": 4, "examples_per_request": 2, "exemplars": 2, "teacher": teacher,
                   "fidelity": {"folds": 2, "max_auc": 1.0, **synth.pop("fidelity", {})},
                   "filters": {"length_slack": 2.0, **synth.pop("filters", {})}, **synth}
        return make_recipe(model_dir, data={"train": train.name, "test": test.name, "split": {"valid": 0.0}}, synth=section)

    return make


# Extract: paraphrased customer messages per filled-field set, every value copied from its text.
GEN_EXTRACT = {
    "product + problem": [
        ("the hair dryer blows only cold air", "hair dryer", "blows only cold air"),
        ("my rice cooker lid will not close properly", "rice cooker", "lid will not close"),
        ("the electric kettle switches off before boiling", "electric kettle", "switches off before boiling"),
        ("the bike pump has a bent valve", "bike pump", "bent valve"),
        ("my tablet case split along the hinge", "tablet case", "split along the hinge"),
        ("the steam iron drips water on my shirts", "steam iron", "drips water"),
        ("the ceiling fan hums loudly at night", "ceiling fan", "hums loudly"),
        ("the garden hose bursts near the tap", "garden hose", "bursts near the tap"),
    ],
    "product": [
        ("has the microwave shipped yet", "microwave", None),
        ("could i exchange the duvet for a bigger size", "duvet", None),
        ("is there a warranty on the sewing machine", "sewing machine", None),
        ("when does the dishwasher arrive", "dishwasher", None),
        ("can i order a second pillow cover", "pillow cover", None),
        ("do you deliver the treadmill upstairs", "treadmill", None),
    ],
}


def filled_of(body: dict[str, Any]) -> str:
    names = re.search(r"^Filled fields: (.+)$", body["messages"][-1]["content"], re.MULTILINE).group(1)
    return " + ".join(n.strip() for n in names.split(","))


def extract_examples(items: list[tuple[str, str, str | None]]) -> str:
    return json.dumps({"examples": [{"text": t, "output": {"product": p, "problem": q}} for t, p, q in items]})


def good_extract_answer(body: dict[str, Any], _attempt: int) -> Answer:
    """New messages of the asked filled-field set, picked by the request's seed."""
    pool, n, seed = GEN_EXTRACT[filled_of(body)], n_of(body), body.get("seed", 0)
    return 200, {}, extract_examples([pool[(seed * 3 + i) % len(pool)] for i in range(n)])


GEN_GENERATE = [
    ("hi, the dining table i ordered a month ago is still not here and nobody answers the phone at your depot",
     "dining table a month late, depot unreachable"),
    ("the toaster i bought last week only heats on one side and the bread comes out half raw",
     "new toaster heats one side only"),
    ("you took the payment for my curtains twice and i need the second charge reversed",
     "curtains paid twice, wants second charge reversed"),
    ("will the running shoes in size nine be available again before the marathon in april",
     "asks if size nine running shoes return before april"),
    ("the courier left my package at the shop next door but the shop says it is not there",
     "package left at shop next door, not found"),
    ("please send the rest of my order to my parents instead, i will be staying with them",
     "wants rest of order sent to parents"),
    ("the speaker stopped connecting by bluetooth after two days and resetting it did nothing",
     "speaker bluetooth failed after two days"),
    ("i sent the coat back three weeks ago and i have not seen any money come back yet",
     "coat refund missing three weeks after return"),
    ("the gift card from my birthday is rejected at checkout with a message about an invalid number",
     "birthday gift card rejected as invalid"),
    ("cancel the order for the desk chair please, it is taking far too long",
     "wants slow desk chair order cancelled"),
]


def good_generate_answer(body: dict[str, Any], _attempt: int) -> Answer:
    """New (message, summary) pairs, picked by the request's seed."""
    n, seed = n_of(body), body.get("seed", 0)
    pairs = [GEN_GENERATE[(seed * 3 + i) % len(GEN_GENERATE)] for i in range(n)]
    return 200, {}, json.dumps({"examples": [{"text": t, "target": s} for t, s in pairs]})


def extract_recipe_factory(make_recipe: Callable[..., Path], model_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """``make(url, **synth)``: a toy extract recipe (16 real rows in train, 3 in test) whose synth section asks ``url``."""
    from toydata import EXTRACT_FIELDS, EXTRACT_ROWS, extract_row

    train = write_jsonl(tmp_path / "train.jsonl", [extract_row(*r) for r in EXTRACT_ROWS])
    test = write_jsonl(tmp_path / "test.jsonl", [extract_row("the juicer leaks juice everywhere", "juicer", "leaks juice everywhere"),
                                                 extract_row("where is my electric blanket", "electric blanket", None),
                                                 extract_row("the scale shows the wrong weight", "scale", "shows the wrong weight")])
    task = {"type": "extract", "labels": None, "instruction": "Extract the product and the problem.", "fields": EXTRACT_FIELDS}
    return _factory(make_recipe, model_dir, train, test, task)


def generate_recipe_factory(make_recipe: Callable[..., Path], model_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """``make(url, **synth)``: a toy generate recipe (the first 12 pairs in train, 2 in test) whose synth section asks ``url``."""
    from toydata import GENERATE_ROWS

    rows = [{"text": t, "target": s} for t, s in GENERATE_ROWS]
    train, test = write_jsonl(tmp_path / "train.jsonl", rows[:12]), write_jsonl(tmp_path / "test.jsonl", rows[12:])
    task = {"type": "generate", "labels": None, "instruction": "Summarise the customer message for the agent."}
    return _factory(make_recipe, model_dir, train, test, task)


def _factory(make_recipe: Callable[..., Path], model_dir: Path, train: Path, test: Path, task: dict[str, Any]) -> Callable[..., Path]:
    def make(url: str, **synth: Any) -> Path:
        teacher = {"base_url": url, "model": "fake-teacher", "concurrency": 4, "max_attempts": 3, **synth.pop("teacher", {})}
        section = {"total": 6, "examples_per_request": 2, "exemplars": 2, "teacher": teacher,
                   "fidelity": {"folds": 2, "max_auc": 1.0, **synth.pop("fidelity", {})},
                   "filters": {"length_slack": 1.0, **synth.pop("filters", {})}, **synth}
        return make_recipe(model_dir, data={"train": train.name, "test": test.name, "split": {"valid": 0.0}}, task=task, synth=section)

    return make

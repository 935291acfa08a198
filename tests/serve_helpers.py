"""Helpers for the serving tests: tiny trained adapters, a real uvicorn server on 127.0.0.1 in a thread."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from microtune.serving.engine import Engine, Job
from toydata import LABELS, TEXTS, write_jsonl

# Adapter B maps the toy texts onto two coarser labels, so A and B answer from different label sets.
COARSE = {"billing": "money", "refund": "money", "shipping": "parcel"}


# Out-of-scope texts for a none_label recipe, and a second label for some texts of a multi-label one.
OUT_OF_SCOPE = ["what is the weather today", "tell me a joke", "who won the match", "play some music", "what time is it",
                "book a table for two", "translate hello to french", "how tall is everest"]
ALSO = {"billing": "refund", "shipping": "refund", "refund": "billing"}


def toy_label(label: str, i: int, variant: str, coarse: bool) -> Any:
    """The label a toy row gets in a recipe variant: coarse (two labels), multi (a second label on every third row)."""
    if variant == "multi":
        return sorted({label, ALSO[label]}) if i % 3 == 0 else [label]
    return COARSE[label] if coarse else label


def write_recipe(folder: Path, name: str, base: Path, coarse: bool, method: dict[str, Any] | None = None, variant: str = "",
                 train: dict[str, Any] | None = None) -> Path:
    """A toy recipe (and its data) for the serving tests: ``method`` a recipe method section; ``variant`` "" (one label),
    "multi" (multi_label, up to 2 labels) or "oos" (none_label `oos`, with out-of-scope rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": TEXTS[l][i], "label": toy_label(l, i, variant, coarse)} for i in range(6) for l in LABELS]
    test = [{"text": TEXTS[l][i], "label": toy_label(l, i, variant, coarse)} for i in (6, 7) for l in LABELS]
    task: dict[str, Any] = {"type": "classify", "instruction": "Route the message." if coarse else "Name the support topic."}
    if variant == "multi":
        task |= {"multi_label": True, "max_labels": 2}
    elif variant == "oos":
        task |= {"none_label": "oos"}
        rows += [{"text": t, "label": "oos"} for t in OUT_OF_SCOPE[:6]]
        test += [{"text": t, "label": "oos"} for t in OUT_OF_SCOPE[6:]]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", test)
    recipe = {"name": name, "task": task,
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}}, "model": {"base": str(base)},
              "train": {"epochs": 2, "batch_size": 4, "max_seq_len": 96, "lr": 2e-2, "seed": 1 if coarse else 2, "bf16": False} | (train or {}),
              "eval": {"shots": 2, "batch_size": 4}}
    if method is not None:
        recipe["method"] = method
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def eval_answers(adapter: Path, base: Path, texts: list[str], model: Any = None) -> list[tuple[str, float]]:
    """What `eval`'s micro predictor answers for these texts: the artifact loaded as eval loads it (``load_trained``, or
    ``model`` when given), the prompt eval builds, the candidates and the scorer of ``task.decoder()``."""
    from microtune.config import artifact_recipe
    from microtune.core.artifacts import read_manifest
    from microtune.models import BaseModelRef, LabelPredictor, load_tokenizer, load_trained
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    recipe = artifact_recipe(adapter / "recipe.json")
    ref = BaseModelRef(str(base), str(base), str(base), "x")
    renderer = Renderer(load_tokenizer(ref))
    task = get_task(recipe.task, read_manifest(adapter, "adapter")["labels"])
    candidates = task.decoder().candidates
    prompts = [renderer.encode(task.messages({"text": t}), candidates[0], recipe.train.max_seq_len)[0] for t in texts]
    model = model if model is not None else load_trained(ref, adapter)
    return LabelPredictor(model, renderer, candidates, scoring=task.decoder().scoring).predict(prompts)


def agreement_with_eval(url: str, model: str, eval_dir: Path) -> float:
    """Share of an eval's test rows (``predictions.jsonl``) on which the server's answer equals eval's micro prediction;
    printed, so a test or a benchmark run shows it (qlora served on the full-precision base vs its 4-bit evaluation)."""
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    same = 0
    for row in rows:
        status, body = call("POST", url + "/v1/completions", {"model": model, "prompt": row["text"]})
        assert status == 200, body
        same += body["choices"][0]["text"] == row["micro"]["pred"]
    share = same / len(rows)
    print(f"{model}: served answers agree with eval's micro predictions on {same}/{len(rows)} test rows ({share:.0%})")
    return share


class HeldEngine(Engine):
    """The real engine with controls a test sets instead of racing the clock (through ``build_app(engine_class=)``).

    ``gate``: while it is clear the worker takes no job, so requests pile up in the queue (set by default).
    ``hold_generations``: a generation is not admitted until its request is cancelled (the server timed it out, or the
    client left), so it can never finish in time; ``holding`` is set once the worker holds one. Either way the real
    code then runs: a cancelled generation leaves the running batch at its next step, as it does in production.
    ``pause_after``: after that many generation step rounds the worker waits for ``resume`` (``paused`` is set), so a
    test can queue requests that join the running batch at a known step. ``rounds``: per step round, the jobs running
    in each generator (by generator key) before the round — which rows shared a batch, and when.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gate, self.holding, self.hold_generations = threading.Event(), threading.Event(), False
        self.paused, self.resume, self.pause_after = threading.Event(), threading.Event(), None
        self.rounds: list[dict[str, list[Job]]] = []
        self.gate.set()

    def _next_batch(self) -> list[Job] | None:
        while not self.gate.wait(0.05):
            if self._stopping.is_set():
                return None
        return super()._next_batch()

    def _admit(self, job: Job) -> None:
        if self.hold_generations:
            self.holding.set()
            deadline = time.monotonic() + 120  # a safety net: a cancel that never comes fails the test instead of hanging it
            while not job.cancelled and time.monotonic() < deadline:
                time.sleep(0.01)
        super()._admit(job)

    def _step_all(self) -> None:
        if self.running:
            by_gen: dict[str, list[Job]] = {}
            for key, job in self.running.values():
                by_gen.setdefault(key, []).append(job)
            self.rounds.append(by_gen)
        super()._step_all()
        if self.pause_after is not None and len(self.rounds) == self.pause_after:
            self.paused.set()
            assert self.resume.wait(120), "the test never resumed the worker"


def held_app(settings: Any, **controls: Any) -> tuple[Any, HeldEngine]:
    """``(app, engine)`` on a HeldEngine; ``controls`` (``gate_open``, ``hold_generations``) take effect before it starts."""
    from microtune.serving import build_app

    app = build_app(settings, api_keys=[], engine_class=HeldEngine)
    engine = app.state.service.engine
    engine.hold_generations = controls.pop("hold_generations", False)
    if not controls.pop("gate_open", True):
        engine.gate.clear()
    assert not controls, f"unknown controls {sorted(controls)}"
    return app, engine


def wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    """Poll ``condition()`` until it holds; the timeout is a safety net against a hang, not part of what is tested."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.02)


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    """One HTTP request with the standard library: ``(status, parsed JSON or text)``, error statuses included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server on 127.0.0.1 in a thread; ``stop()`` shuts it down as SIGTERM would."""

    def __init__(self, app: Any, wait_ready: bool = True):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while call("GET", self.url + "/health")[0] != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

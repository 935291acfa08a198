"""The playground: a text → each chosen micro-model's answer and the prompted base model's, side by side.

Answers come from `microtune serve`'s own app (``serving.build_app``: catalog, engine, batching, constrained
decoding), built once per base model inside the Studio process and called in-process over ASGI at
``/v1/chat/completions`` — the very route a client of `serve` hits, so the playground cannot drift from what is
served. A micro-model is named as `serve` names it (``NAME@champion``, ``NAME/VERSION``); classify answers
carry their label probabilities (``top_logprobs``), extract answers the parsed JSON (the ``microtune`` field). The
prompted base model gets the micro-model's own instruction and text (the task's ``messages``), constrained to the
label set (classify) or the task's JSON schema (extract) through ``response_format``.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microtune.core.errors import InputError
from microtune.core.workspace import Workspace
from microtune.studio import reading

LOAD_TIMEOUT_S = 300.0


@dataclass
class Answer:
    model: str
    ok: bool
    text: str = ""
    probabilities: list[tuple[str, float]] = field(default_factory=list)
    output: Any = None
    error: str = ""
    task: str = ""


@dataclass
class Choice:
    """A servable model name with what the playground needs to know about it."""
    ref: str          # what `serve` accepts: NAME (champion) or NAME/VERSION
    name: str
    version: str
    task: str
    base: str
    recipe_path: Path


def choices(ws: Workspace) -> list[Choice]:
    out = []
    for name in reading.model_names(ws):
        for v in reading.list_versions(name, ws.root):
            adapter = reading._inside(ws, v.tags.get("adapter_dir"))
            if adapter is None or not (adapter / "recipe.json").is_file():
                continue
            base = _base_of(adapter / "recipe.json")
            ref = f"{name}@{reading.CHAMPION}" if reading.CHAMPION in v.aliases else f"{name}/{v.version}"
            out.append(Choice(ref, name, v.version, v.tags.get("task", "?"), base, adapter / "recipe.json"))
    return sorted(out, key=lambda c: (not c.ref.endswith("@" + reading.CHAMPION), c.name, -int(c.version)))  # champions first


def _base_of(recipe_json: Path) -> str:
    from microtune.config import artifact_recipe

    return artifact_recipe(recipe_json).model.base


class Playground:
    """One serving app per base model, started on first use and stopped with the Studio."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self._apps: dict[str, Any] = {}
        self._lock = threading.Lock()

    def app_for(self, base: str) -> Any:
        with self._lock:
            if base not in self._apps:
                from microtune.serving import ServeSettings, build_app

                settings = ServeSettings(base=base, workspace=self.ws.root, registry=True, poll_s=2.0, max_loaded=4)
                app = build_app(settings, api_keys=[])  # in-process: the Studio's own guard already let the user in
                app.state.service.start()
                self._apps[base] = app
            return self._apps[base]

    def stop(self) -> None:
        with self._lock:
            for app in self._apps.values():
                app.state.service.stop()
            self._apps.clear()

    async def ask(self, text: str, refs: list[str], with_base: bool) -> list[Answer]:
        if not text.strip():
            raise InputError("the playground needs a text", hint="type or paste the text the models should answer")
        if len(text) > 20_000:
            raise InputError(f"the text is {len(text)} characters; the playground takes at most 20000", hint="paste a shorter text")
        known = {c.ref: c for c in choices(self.ws)}
        chosen = [known[r] for r in refs if r in known]
        unknown = [r for r in refs if r not in known]
        if unknown:
            raise reading.NotFound(f"not servable here: {', '.join(u[:40] for u in unknown)}", hint=f"choose among: {', '.join(known)}")
        if not chosen:
            raise InputError("choose at least one micro-model", hint="tick a model above the text")
        answers = []
        for choice in chosen:
            answers.append(await self._micro(choice, text))
        if with_base:
            answers.append(await self._base(chosen[0], text))
        return answers

    async def _ready(self, base: str) -> Any:
        app = await asyncio.to_thread(self.app_for, base)
        engine = app.state.service.engine
        await asyncio.to_thread(engine.ready.wait, LOAD_TIMEOUT_S)
        if engine.load_error:
            raise InputError(f"the base model {base!r} did not load: {engine.load_error}")
        return app

    async def _micro(self, choice: Choice, text: str) -> Answer:
        app = await self._ready(choice.base)
        body: dict[str, Any] = {"model": choice.ref, "messages": [{"role": "user", "content": text}]}
        if choice.task == "classify":
            body |= {"logprobs": True, "top_logprobs": 20}
        status, reply = await asgi_post(app, "/v1/chat/completions", body)
        return _answer(choice.ref, choice.task, status, reply)

    async def _base(self, like: Choice, text: str) -> Answer:
        """The prompted base model on the same instruction and text, constrained like the micro-model's task."""
        from microtune.config import artifact_recipe
        from microtune.tasks import get_task

        recipe = artifact_recipe(like.recipe_path)
        labels = list(getattr(recipe.task, "labels", None) or [])
        adapter_manifest = json.loads((like.recipe_path.parent / "manifest.json").read_text())
        labels = adapter_manifest.get("labels") or labels
        task = get_task(recipe.task, labels)
        app = await self._ready(like.base)
        body: dict[str, Any] = {"model": app.state.service.catalog.base_name, "messages": task.messages({"text": text}), "temperature": 0}
        decoder = task.decoder()
        if like.task == "classify" and labels:
            schema = {"type": "object", "properties": {"label": {"type": "string", "enum": labels}}, "required": ["label"],
                      "additionalProperties": False}
            body |= {"response_format": {"type": "json_schema", "json_schema": {"name": "label", "schema": schema}}, "max_tokens": 48}
        elif decoder.kind == "json":
            body |= {"response_format": {"type": "json_schema", "json_schema": {"name": "fields", "schema": decoder.schema}},
                     "max_tokens": decoder.max_new_tokens}
        else:
            body["max_tokens"] = getattr(decoder, "max_new_tokens", 64) or 64
        status, reply = await asgi_post(app, "/v1/chat/completions", body)
        answer = _answer("prompted base model", "base", status, reply)
        if answer.ok and like.task in ("classify", "extract"):
            try:
                answer.output = json.loads(answer.text)
            except ValueError:
                answer.output = None
        return answer


def _answer(model: str, task: str, status: int, reply: dict[str, Any]) -> Answer:
    if status != 200:
        message = (reply.get("error") or {}).get("message", str(reply)) if isinstance(reply, dict) else str(reply)
        return Answer(model, False, error=f"{status}: {message}", task=task)
    choice = reply["choices"][0]
    text = choice["message"]["content"]
    probs: list[tuple[str, float]] = []
    content = ((choice.get("logprobs") or {}).get("content") or [])
    if content:
        top = content[0].get("top_logprobs") or [{"token": content[0]["token"], "logprob": content[0]["logprob"]}]
        probs = [(t["token"], math.exp(t["logprob"])) for t in top]
    ext = reply.get("microtune") or {}
    return Answer(model, True, text=text, probabilities=probs, output=ext.get("output"), task=task)


async def asgi_post(app: Any, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
    """POST JSON to an ASGI app in this process and return ``(status, parsed body)`` — `serve`'s route, no socket."""
    body = json.dumps(payload).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    sent = False
    finished = asyncio.Event()
    status, chunks = 500, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                finished.set()

    await app(scope, receive, send)
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", errors="replace")

"""The HTTP API: OpenAI-compatible routes over the engine, with auth, limits, errors and metrics.

    app = build_app(ServeSettings(adapters={"intents": Path("adapter/")}))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: microtune serve --adapter intents=adapter/

Routes: POST /v1/chat/completions, POST /v1/completions (both with ``stream``), GET /v1/models,
POST /admin/reload, GET /health (never needs a key), GET /metrics (Prometheus text).
A `classify` micro-model answers the most probable valid answer of the last user message (the
prompt built exactly as in training and evaluation; the answers its evaluation decodes: a label, or a
label set with multi_label), with its probability. An `extract` micro-model answers the JSON object its
evaluation generates (eval's prompt, constrained to the task's schema; the `microtune` field carries the
parsed object), a `generate` micro-model its free text, a `chat` micro-model its reply to the whole
conversation (``messages`` as sent: system message and earlier turns, in the turn order it was trained on;
`/v1/completions` sends one user turn); each up to the recipe's ``task.max_new_tokens`` (a request may lower
it, a higher ``max_tokens`` is a 400). The base model generates freely, or JSON with
``response_format`` (``json_object``, or ``json_schema`` with the client's schema: grammar-constrained).
Every generation runs in its model instance's continuous batch (``engine``), streamed as it grows.

Hardening: the body is read as it streams in and refused (413) as soon as it passes the limit, chunked
or not; a classify prompt longer than the model was trained on (``train.max_seq_len``, prompt + longest
answer) is refused (400 ``context_length_exceeded``) rather than cut; error messages quote at most a
short prefix of any value a client sent (``catalog.quote``).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from microtune.core.errors import MicrotuneError
from microtune.serving import schemas as S
from microtune.serving.catalog import BASE, AdapterSpec, Catalog, UnknownModel, quote
from microtune.serving.engine import Engine, Job, Overloaded, QueueFull
from microtune.serving.metrics import Metrics
from microtune.serving.settings import ServeSettings
from microtune.tasks import get_task

log = logging.getLogger("microtune.serving")


class Service:
    """What the routes share: settings, catalog, engine, metrics, accepted keys."""

    def __init__(self, settings: ServeSettings, catalog: Catalog, engine: Engine, metrics: Metrics, keys: list[str]):
        self.settings, self.catalog, self.engine, self.metrics, self.keys = settings, catalog, engine, metrics, keys
        self._stop_poll = threading.Event()
        self._tasks: dict[str, tuple[Any, str, int]] = {}
        self._gen_tasks: dict[str, Any] = {}

    def start(self) -> None:
        self.engine.start()
        if self.settings.poll_s > 0:
            threading.Thread(target=self._poll, name="microtune-reload", daemon=True).start()

    def stop(self) -> None:
        self._stop_poll.set()
        self.engine.stop(self.settings.timeout_s)

    def _poll(self) -> None:
        """Hot reload: re-resolve aliases every poll_s seconds (a promotion moves `champion`)."""
        while not self._stop_poll.wait(self.settings.poll_s):
            try:
                self.catalog.refresh()
            except Exception as exc:  # a registry hiccup must not stop polling
                log.warning("alias refresh failed: %s", exc)

    # -- request plumbing -------------------------------------------------------------------------
    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        body = await self.read_body(request)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise S.ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = _short_text(".".join(str(p) for p in first["loc"]))  # a field name is client input too
            raise S.ApiError(422, f"{where}: {first['msg']} (got {_short(first.get('input'))})", where or None, "invalid_value") from None

    async def read_body(self, request: Request) -> bytes:
        """The body, counted as it streams in: a chunked body (no Content-Length) over the limit answers 413 as soon as
        it passes the limit, without being read whole (a declared one is refused before the route: ``_refuse``)."""
        limit, size, chunks = self.settings.max_body_bytes, 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise S.ApiError(413, f"request body is over {limit} bytes (the limit; stopped reading at {size})", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def lookup(self, model: str) -> AdapterSpec | str:
        if not self.engine.ready.is_set():
            note = f": {self.engine.load_error}" if self.engine.load_error else "; retry in a few seconds"
            raise S.ApiError(503, f"the base model is loading{note}", code="loading")
        try:
            return await asyncio.to_thread(self.catalog.lookup, model)
        except UnknownModel as exc:
            raise S.ApiError(404, f"{exc.message}; {exc.hint}" if exc.hint else exc.message, "model", "model_not_found") from None
        except MicrotuneError as exc:
            raise S.ApiError(400, f"{exc.message}; fix: {exc.hint}" if exc.hint else exc.message, "model", "model_not_servable") from None

    def job(self, kind: str, target: AdapterSpec | str, prompt: list[int], on_text: Any = None, **params: Any) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(kind, target, prompt, loop, loop.create_future(), params, on_text)
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise S.ApiError(429, f"the server is busy: {exc}; retry later", code="queue_full") from None
        except Overloaded as exc:
            self.metrics.shed.inc()
            raise S.ApiError(429, f"the server is overloaded: {exc}; retry in {exc.retry_after}s", code="overloaded",
                             headers={"Retry-After": str(exc.retry_after)}) from None
        return job

    async def wait(self, job: Job) -> Any:
        try:
            return await asyncio.wait_for(job.future, self.settings.timeout_s - (time.monotonic() - job.enqueued))
        except TimeoutError:
            job.cancelled = True
            raise S.ApiError(504, f"the request took longer than the {self.settings.timeout_s:g}s timeout", code="timeout") from None

    # -- prompts ----------------------------------------------------------------------------------
    def _task(self, spec: AdapterSpec) -> tuple[Any, str, int]:
        """``(task, longest answer, its completion length)`` of a micro-model, computed once per adapter version."""
        if spec.key not in self._tasks:
            sizes = {answer: len(self.engine.renderer.completion_ids(answer)) for answer in spec.answers}
            longest = max(sizes, key=sizes.__getitem__)
            self._tasks[spec.key] = (get_task(spec.recipe.task, spec.labels), longest, sizes[longest])
        return self._tasks[spec.key]

    def classify_prompt(self, spec: AdapterSpec, text: str, chat: bool) -> list[int]:
        """The micro prompt of evaluation: the trained instruction + the text.

        A prompt that does not fit the trained length with the longest answer (``train.max_seq_len``: the model never
        saw a longer sequence, and evaluation measured it on texts cut to fit) is refused, not cut: a 200 for a text the
        model never read whole would hide the cut. The base model's own context (max_position_embeddings) is at least
        as long in every recipe check accepts, so the trained length is the limit that binds."""
        task, _, need = self._task(spec)
        prompt = self.engine.renderer.prompt_ids(task.messages({"text": text}))
        limit = spec.recipe.train.max_seq_len
        if len(prompt) + need > limit:
            raise S.ApiError(400, f"the prompt is {len(prompt)} tokens and the longest answer {need}; model {spec.name!r} was trained on "
                                  f"at most {limit} tokens (train.max_seq_len): shorten the text", "messages" if chat else "prompt",
                             "context_length_exceeded")
        return prompt

    def check_classify(self, req: S.Sampling, spec: AdapterSpec, max_tokens: int | None) -> None:
        for name, neutral in (("temperature", 0), ("top_p", 1)):
            value = getattr(req, name)
            if value is not None and value != neutral:
                raise S.ApiError(400, f"{name}: classify model {spec.name!r} answers its most probable label; sampling does not apply "
                                      f"(got {value}); leave {name} out", name, "unsupported_parameter")
        if req.stop:
            raise S.ApiError(400, f"stop: classify model {spec.name!r} answers one label; leave stop out", "stop", "unsupported_parameter")
        fmt = req.response_format.type if req.response_format else "text"
        if fmt != "text":
            raise S.ApiError(400, f"response_format: classify model {spec.name!r} answers a label (the content is the label text, the "
                                  f"`microtune` field lists the labels), not JSON; got {fmt!r}: leave response_format out or use text",
                             "response_format", "unsupported_parameter")
        need = self._task(spec)[2]
        if max_tokens is not None and max_tokens < need:
            raise S.ApiError(400, f"max_tokens: the longest label of {spec.name!r} needs {need} tokens, got {max_tokens}",
                             "max_tokens", "max_tokens_too_small")

    def generation_params(self, req: S.Sampling, prompt: list[int], max_tokens: int | None, default: int, chat: bool) -> dict[str, Any]:
        limit = self.settings.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise S.ApiError(400, f"max_tokens: at most {limit} on this server, got {max_tokens}", "max_tokens", "max_tokens_too_large")
        if len(prompt) > self.settings.max_prompt_tokens:
            raise S.ApiError(400, f"the prompt is {len(prompt)} tokens; the limit is {self.settings.max_prompt_tokens}",
                             "messages" if chat else "prompt", "context_length_exceeded")
        stops = _check_stops(req)
        tok = self.engine.tok
        eos = {tok.eos_token_id, self.engine.renderer.stop_id} if chat else {tok.eos_token_id}
        return {"max_tokens": max_tokens or min(default, limit), "temperature": req.temperature or 0, "top_p": req.top_p,
                "seed": req.seed, "stop": stops, "eos": sorted(e for e in eos if e is not None)}

    # -- extract, generate and chat micro-models -------------------------------------------------
    def task_of(self, spec: AdapterSpec) -> Any:
        """The task of a micro-model, built once per adapter version."""
        if spec.key not in self._gen_tasks:
            self._gen_tasks[spec.key] = get_task(spec.recipe.task, spec.labels)
        return self._gen_tasks[spec.key]

    def micro_eos(self) -> list[int]:
        """The ids that end a micro-model's answer: eval's (the template's end of turn and the tokenizer's eos)."""
        tok = self.engine.tok
        return sorted(t for t in {self.engine.renderer.stop_id, tok.eos_token_id} if t is not None)

    def micro_example(self, spec: AdapterSpec, messages: list[dict[str, str]]) -> dict[str, Any]:
        """What a micro-model answers: a chat micro-model (a task with ``example_from_messages``) the whole conversation,
        system message and earlier turns included; the others the last user message's text."""
        from_messages = getattr(self.task_of(spec), "example_from_messages", None)
        if from_messages is None:
            return {"text": _last_user(messages)}
        try:
            return from_messages(messages)
        except ValueError as exc:
            raise S.ApiError(400, f"messages: {exc}", "messages", "invalid_conversation") from None

    def micro_prompt(self, spec: AdapterSpec, task: Any, example: dict[str, Any], chat: bool) -> list[int]:
        """Eval's micro prompt (the trained instruction + the text, or a chat model's conversation). A prompt that leaves
        no room for an answer within the trained length (``train.max_seq_len``) is refused, not cut, as for classify models."""
        prompt = self.engine.renderer.prompt_ids(task.messages(example))
        limit = spec.recipe.train.max_seq_len
        if len(prompt) >= limit:
            raise S.ApiError(400, f"the prompt is {len(prompt)} tokens; model {spec.name!r} was trained on at most {limit} tokens "
                                  "(train.max_seq_len) with its answer: shorten the text", "messages" if chat else "prompt",
                             "context_length_exceeded")
        return prompt

    def check_micro_generation(self, req: S.Sampling, spec: AdapterSpec, decoder: Any, max_tokens: int | None) -> None:
        """What an extract/generate micro-model takes: ``max_tokens`` up to the recipe's ``task.max_new_tokens`` (the
        length it was evaluated at: a request may lower it, never raise it); ``stop`` on generate only (it would cut
        extract's JSON object); ``response_format``: extract takes ``json_object`` and its own schema, generate text."""
        if max_tokens is not None and max_tokens > decoder.max_new_tokens:
            raise S.ApiError(400, f"max_tokens: model {spec.name!r} answers in at most {decoder.max_new_tokens} tokens (task.max_new_tokens "
                                  f"of its recipe), got {max_tokens}; send at most {decoder.max_new_tokens} or leave it out",
                             "max_tokens", "max_tokens_too_large")
        _check_stops(req)
        fmt = _format(req)
        if decoder.kind == "json":
            if req.stop:
                raise S.ApiError(400, f"stop: extract model {spec.name!r} answers one JSON object, which a stop sequence would cut; leave "
                                      "stop out", "stop", "unsupported_parameter")
            if fmt == "json_schema" and _client_schema(req) != decoder.schema:
                raise S.ApiError(400, f"response_format: extract model {spec.name!r} answers JSON following its own schema (its "
                                      "recipe's task.fields, each required, a string, a list of strings or null) and the json_schema "
                                      "sent differs; send json_object or leave response_format out (the answer follows its schema "
                                      "either way), or send its schema exactly", "response_format", "schema_mismatch")
        elif fmt != "text":
            raise S.ApiError(400, f"response_format: {spec.task} model {spec.name!r} answers free text, not JSON (got {fmt!r}); leave "
                                  "response_format out or use text", "response_format", "unsupported_parameter")


def _short(value: Any) -> str:
    return quote(value)


def _short_text(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unsupported(req: S.Sampling) -> None:
    """400 for OpenAI fields whose value this server does not implement (accepted at their neutral value)."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value:
            raise S.ApiError(400, f"{name}: penalties are not implemented (got {value}); leave it out or send 0", name, "unsupported_parameter")
    if req.logit_bias:
        raise S.ApiError(400, f"logit_bias: token biases are not implemented (got {len(req.logit_bias)} entries); leave it out or send {{}}",
                         "logit_bias", "unsupported_parameter")
    if req.tools:
        raise S.ApiError(400, f"tools: micro-models do not call tools (got {len(req.tools)}); leave tools out", "tools", "unsupported_parameter")
    if isinstance(req.tool_choice, dict):
        raise S.ApiError(400, "tool_choice: micro-models do not call tools; use none or auto (or leave it out)", "tool_choice",
                         "unsupported_parameter")


def _check_stops(req: S.Sampling) -> list[str]:
    stops = req.stops()
    if len(stops) > 4:
        raise S.ApiError(400, f"stop: up to 4 sequences, got {len(stops)}", "stop", "unsupported_parameter")
    return stops


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def _last_user(messages: list[dict[str, str]]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    raise S.ApiError(400, "messages: a classify model needs a user message (the text to classify)", "messages", "missing_user_message")


# -- responses ------------------------------------------------------------------------------------
async def micro_response(svc: Service, req: S.ChatRequest | S.CompletionRequest, spec: AdapterSpec, messages: list[dict[str, str]],
                         chat: bool) -> Response:
    """A micro-model's answer to ``messages`` by its task type: a label (classify) or generated text (extract, generate, chat)."""
    example = svc.micro_example(spec, messages)
    if spec.task == "classify":
        return await classify_response(svc, req, spec, example["text"], chat)
    return await micro_generate_response(svc, req, spec, example, chat)


async def classify_response(svc: Service, req: S.ChatRequest | S.CompletionRequest, spec: AdapterSpec, text: str, chat: bool) -> Response:
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    svc.check_classify(req, spec, max_tokens)
    prompt = svc.classify_prompt(spec, text, chat)
    job = svc.job("classify", spec, prompt, top_logprobs=req.top_k())
    kind = "chat.completion" if chat else "text_completion"
    if req.stream:
        return StreamingResponse(_classify_stream(svc, req, spec, job, kind, len(prompt)), media_type="text/event-stream")
    answer = await svc.wait(job)
    label = answer["label"]
    used = S.usage(len(prompt), len(svc.engine.renderer.completion_ids(label)))
    body = S.envelope(kind, req.model, spec.fingerprint) | {"usage": used, "microtune": _extension(spec, answer)}
    choice = {"index": 0, "finish_reason": "stop", "logprobs": _logprobs(req, answer, chat)}
    body["choices"] = [choice | ({"message": {"role": "assistant", "content": label}} if chat else {"text": label})]
    return JSONResponse(body)


def _extension(spec: AdapterSpec, answer: dict[str, Any]) -> dict[str, Any]:
    """The `microtune` field: the answer, its labels (a multi-label answer is a label set), its probability, the version."""
    from microtune.tasks.classify import JOIN

    cfg, label = spec.recipe.task, answer["label"]
    labels = label.split(JOIN) if getattr(cfg, "multi_label", False) else [label]
    out = {"task": "classify", "label": label, "labels": labels, "probability": answer["prob"], "model_version": spec.fingerprint}
    if getattr(cfg, "none_label", None):
        out["out_of_scope"] = label == cfg.none_label
    return out


def _logprobs(req: S.ChatRequest | S.CompletionRequest, answer: dict[str, Any], chat: bool) -> dict[str, Any] | None:
    """Chat: the answer's log-probability unless ``logprobs: false`` (+ ``top_logprobs`` answers); completions: the legacy shape."""
    if chat and req.logprobs is False:
        return None
    shape = S.label_logprobs if chat else S.completion_logprobs
    return shape(answer["label"], answer["prob"], answer["top"])


async def _classify_stream(svc: Service, req: S.Sampling, spec: AdapterSpec, job: Job, kind: str, n_prompt: int) -> AsyncIterator[str]:
    head = S.envelope(kind + ".chunk" if kind.startswith("chat") else kind, req.model, spec.fingerprint)
    try:
        answer = await svc.wait(job)
    except S.ApiError as exc:
        yield _sse(exc.body())
        return
    chat, label = kind.startswith("chat"), answer["label"]
    pieces = [{"role": "assistant", "content": ""}, {"content": label}] if chat else [{"text": label}]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        choice = {"index": 0, "finish_reason": "stop" if last else None, "logprobs": _logprobs(req, answer, chat) if last else None}
        yield _sse(head | {"choices": [choice | ({"delta": piece} if chat else piece)]})
    if req.stream_options and req.stream_options.include_usage:
        yield _sse(head | {"choices": [], "usage": S.usage(n_prompt, len(svc.engine.renderer.completion_ids(label)))})
    yield _sse("[DONE]")


def check_generation(req: S.ChatRequest | S.CompletionRequest) -> None:
    """What generation does not do yet: log-probabilities (400, not ignored)."""
    wants = req.top_k() or (isinstance(req, S.ChatRequest) and req.logprobs) or (isinstance(req, S.CompletionRequest) and req.logprobs is not None)
    if wants:
        raise S.ApiError(400, "logprobs: generated answers do not return log-probabilities yet (classify micro-models do); leave "
                              "logprobs out", "logprobs", "unsupported_parameter")


def _format(req: S.Sampling) -> str:
    return req.response_format.type if req.response_format else "text"


def _client_schema(req: S.Sampling) -> dict[str, Any]:
    """The schema of a ``json_schema`` response_format (OpenAI's shape: ``{"name", "schema", "strict"}``)."""
    body = req.response_format.json_schema or {}
    schema = body.get("schema")
    if not isinstance(schema, dict):
        raise S.ApiError(400, "response_format.json_schema.schema: give the JSON schema of the answer as an object (got "
                              f"{_short(schema)})", "response_format", "invalid_value")
    return schema


async def base_constraint(svc: Service, req: S.Sampling, eos: list[int]) -> Any:
    """The base model's ``response_format``: ``json_object`` → any JSON object, ``json_schema`` → the client's schema
    (grammar-constrained per row, ``models.constrain``); ``text`` → None. A schema the grammar cannot take is a 400."""
    from microtune.models.constrain import json_object, json_schema

    fmt = _format(req)
    if fmt == "text":
        return None
    schema = _client_schema(req) if fmt == "json_schema" else None
    try:  # the first constraint of a tokenizer builds its vocabulary table (~0.3 s): not on the event loop
        if schema is None:
            return await asyncio.to_thread(json_object, svc.engine.tok, eos)
        return await asyncio.to_thread(json_schema, schema, svc.engine.tok, eos)
    except ValueError as exc:
        raise S.ApiError(400, f"response_format: {exc}", "response_format", "invalid_schema") from None


async def generate_response(svc: Service, req: S.ChatRequest | S.CompletionRequest, prompt: list[int], chat: bool) -> Response:
    """The base model's free generation (or JSON with ``response_format``), in the shared base's running batch."""
    check_generation(req)
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    params = svc.generation_params(req, prompt, max_tokens, 512 if chat else 16, chat)
    params["constraint"] = await base_constraint(svc, req, params["eos"])
    return await _generation(svc, req, BASE, prompt, params, chat, None, None)


async def micro_generate_response(svc: Service, req: S.ChatRequest | S.CompletionRequest, spec: AdapterSpec, example: dict[str, Any],
                                  chat: bool) -> Response:
    """An extract or generate micro-model: eval's micro prompt and decoder (extract: the task's JSON schema, per row), in
    its instance's running batch; the `microtune` field carries the answer as eval parses it."""
    from microtune.models.constrain import json_schema

    check_generation(req)
    task = svc.task_of(spec)
    decoder = task.decoder()
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    svc.check_micro_generation(req, spec, decoder, max_tokens)
    prompt = svc.micro_prompt(spec, task, example, chat)
    eos = svc.micro_eos()
    params = {"max_tokens": max_tokens or decoder.max_new_tokens, "temperature": req.temperature or 0, "top_p": req.top_p,
              "seed": req.seed, "stop": req.stops(), "eos": eos, "constraint": None}
    if decoder.kind == "json":
        params["constraint"] = await asyncio.to_thread(json_schema, decoder.schema, svc.engine.tok, eos)

    def extension(answer: str) -> dict[str, Any]:
        return {"task": spec.task, "output": task.parse(answer), "model_version": spec.fingerprint}

    return await _generation(svc, req, spec, prompt, params, chat, spec.fingerprint, extension)


async def _generation(svc: Service, req: S.ChatRequest | S.CompletionRequest, target: AdapterSpec | str, prompt: list[int],
                      params: dict[str, Any], chat: bool, fingerprint: str | None, extension: Any) -> Response:
    """Queue one generation; answer it whole, or stream its text as the running batch produces it (``on_text``)."""
    kind = "chat.completion" if chat else "text_completion"
    if not req.stream:
        job = svc.job("generate", target, prompt, **params)
        out = await svc.wait(job)
        body = S.envelope(kind, req.model, fingerprint) | {"usage": S.usage(len(prompt), len(out["ids"]))}
        if extension is not None:
            body["microtune"] = extension(out["text"])
        choice = {"index": 0, "finish_reason": out["finish_reason"], "logprobs": None}
        body["choices"] = [choice | ({"message": {"role": "assistant", "content": out["text"]}} if chat else {"text": out["text"]})]
        return JSONResponse(body)
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    job = svc.job("generate", target, prompt, on_text=pieces.put_nowait, **params)
    job.future.add_done_callback(lambda _: pieces.put_nowait(None))
    stream = _generate_stream(svc, req, job, pieces, kind, len(prompt), fingerprint, extension)
    return StreamingResponse(stream, media_type="text/event-stream")


async def _generate_stream(svc: Service, req: S.Sampling, job: Job, pieces: asyncio.Queue, kind: str, n_prompt: int,
                           fingerprint: str | None, extension: Any) -> AsyncIterator[str]:
    chat = kind.startswith("chat")
    head = S.envelope(kind + ".chunk" if chat else kind, req.model, fingerprint)

    def chunk(piece: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> str:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        return _sse(head | {"choices": [choice | ({"delta": piece} if chat else piece)]} | (extra or {}))

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        deadline = job.enqueued + svc.settings.timeout_s
        while (text := await asyncio.wait_for(pieces.get(), max(deadline - time.monotonic(), 0))) is not None:
            yield chunk({"content": text} if chat else {"text": text})
        out = job.future.result()
        extra = {"microtune": extension(out["text"])} if extension is not None else None
        yield chunk({} if chat else {"text": ""}, out["finish_reason"], extra)
        if req.stream_options and req.stream_options.include_usage:
            yield _sse(head | {"choices": [], "usage": S.usage(n_prompt, len(out["ids"]))})
        yield _sse("[DONE]")
    except TimeoutError:
        yield _sse(S.ApiError(504, f"the request took longer than the {svc.settings.timeout_s:g}s timeout", code="timeout").body())
    except Exception as exc:  # the worker failed this request: tell the client in the stream (headers are gone)
        yield _sse(S.ApiError(500, f"generation failed: {exc}", code="server_error").body())
    finally:
        job.cancelled = True  # a client that left (or finished) frees its row at the next step


# -- the app --------------------------------------------------------------------------------------
def create_app(svc: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.start()
        yield
        await asyncio.to_thread(svc.stop)  # uvicorn has already let in-flight requests finish

    app = FastAPI(title="microtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc  # for code that embeds the app (and tests): the engine, catalog and metrics behind the routes
    _middleware(app, svc)
    _routes(app, svc)
    return app


def _middleware(app: FastAPI, svc: Service) -> None:
    @app.exception_handler(S.ApiError)
    async def api_error(_: Request, exc: S.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(S.ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).body(),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        response = _refuse(svc, request) or await call_next(request)
        route = request.scope.get("route")
        svc.metrics.observe(route.path if route is not None else "other", response.status_code, time.perf_counter() - start)
        return response


def _refuse(svc: Service, request: Request) -> Response | None:
    """401 without a valid key (all but /health), 413 when the declared body is over the limit."""
    if svc.keys and request.url.path != "/health":
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k.encode()) for k in svc.keys):
            err = S.ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > svc.settings.max_body_bytes:
        err = S.ApiError(413, f"request body is {declared} bytes; the limit is {svc.settings.max_body_bytes}", code="request_too_large")
        return JSONResponse(err.body(), status_code=413)
    return None


def _routes(app: FastAPI, svc: Service) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await svc.parse(request, S.ChatRequest)
        unsupported(req)
        target = await svc.lookup(req.model)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        if isinstance(target, AdapterSpec):
            return await micro_response(svc, req, target, messages, chat=True)
        prompt = svc.engine.renderer.prompt_ids(messages)
        return await generate_response(svc, req, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await svc.parse(request, S.CompletionRequest)
        unsupported(req)
        target = await svc.lookup(req.model)
        if isinstance(target, AdapterSpec):
            return await micro_response(svc, req, target, [{"role": "user", "content": req.text()}], chat=False)
        prompt = svc.engine.tok(req.text(), add_special_tokens=False)["input_ids"]
        if not prompt:
            raise S.ApiError(400, "prompt: empty", "prompt", "empty_prompt")
        return await generate_response(svc, req, prompt, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = await asyncio.to_thread(svc.catalog.names)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "microtune"} for n in names]}

    @app.post("/admin/reload")
    async def reload() -> dict[str, Any]:
        changes = await asyncio.to_thread(svc.catalog.refresh)
        return {"changes": changes, "models": svc.catalog.loaded_versions()}

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = svc.engine.ready.is_set()
        status = "ok" if ready else ("failed" if svc.engine.load_error else "loading")
        residency = svc.engine.residency
        body = {"status": status, "base": svc.catalog.base_name, "base_bytes": svc.engine.base_bytes, "adapters_loaded": len(residency),
                "loaded_bytes": residency.nbytes, "max_memory_bytes": residency.max_bytes, "loaded": residency.report(),
                "queue": svc.engine.queue.qsize(), "service_time_s": svc.engine.service_time}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        data, content_type = svc.metrics.render()
        return Response(data, media_type=content_type)

"""The teacher: any OpenAI-compatible chat completions endpoint, asked concurrently, answers cached.

    teacher = Teacher(recipe.synth.teacher, AnswerCache(path))
    answers = teacher.ask_all([TeacherRequest(key, messages, params), ...])   # {key: Answer}

With a ``reporter``, ``ask_all`` emits (stage ``synth``) ``start``, a ``progress`` event per answer
(``data``: ``cached``, how many so far came from the cache) and ``done``.

Retries are the ``openai`` client's own: 429, 408, 409, 5xx and connection errors are retried with
exponential backoff (0.5 s doubling, capped at 8 s) and up to 25 % jitter, and a ``Retry-After`` /
``retry-after-ms`` header up to 60 s is honoured instead; ``teacher.max_attempts`` caps the tries.
A request that still fails is returned as an ``Answer`` with ``error`` set (recorded per row by the
stage), never as an empty answer. Answers are cached on arrival; cached keys are not sent again.

The API key is read from the environment variable the recipe names and handed only to the client;
it is never put in a cache key, a message, a log line or an artifact.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from microtune.config import TeacherConfig
from microtune.core.errors import TeacherError
from microtune.core.progress import Reporter, emitter
from microtune.synthesis.cache import AnswerCache

LOCAL_FIX = ("start `microtune serve` and set synth.teacher.base_url to its /v1 URL (e.g. --set "
             "synth.teacher.base_url=http://127.0.0.1:8000/v1), or point it at any OpenAI-compatible endpoint "
             "(vLLM, llama.cpp, Ollama, a hosted API) with synth.teacher.model")


@dataclass(frozen=True)
class TeacherRequest:
    key: str
    messages: list[dict[str, str]]
    params: dict[str, Any]  # temperature, top_p, max_tokens, seed: part of the cache key


@dataclass
class Answer:
    content: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    cached: bool = False
    refusal: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_cache(self) -> dict[str, Any]:
        return {"content": self.content, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "refusal": self.refusal, "retries": self.retries}

    @classmethod
    def from_cache(cls, data: dict[str, Any]) -> Answer:
        return cls(data["content"], data["prompt_tokens"], data["completion_tokens"], data.get("retries", 0), True, data.get("refusal"))


def resolve_endpoint(cfg: TeacherConfig) -> tuple[str, str]:
    """``(base_url, api_key)``; errors name the field and the fix."""
    if cfg.base_url == "local":
        raise TeacherError("synth.teacher.base_url is `local`: the pipeline (`microtune synth`) starts that server; "
                           "the synth library functions need a URL", hint=LOCAL_FIX)
    if not cfg.base_url.startswith(("http://", "https://")):
        raise TeacherError(f"synth.teacher.base_url must be an http(s) URL ending in /v1 (got {cfg.base_url!r})", hint=LOCAL_FIX)
    if cfg.api_key_env is None:
        return cfg.base_url, "no-key"  # the client insists on a string; keyless local servers ignore it
    key = os.environ.get(cfg.api_key_env, "")
    if not key.strip():
        raise TeacherError(f"synth.teacher.api_key_env names ${cfg.api_key_env}, which is not set or empty",
                           hint=f"export {cfg.api_key_env}=<your key> before running, or set synth.teacher.api_key_env "
                                "to null for an endpoint without a key")
    return cfg.base_url, key


class Teacher:
    def __init__(self, cfg: TeacherConfig, cache: AnswerCache, model: str | None = None):
        self.cfg, self.cache = cfg, cache
        self.model = model or cfg.model or ""
        self.base_url, self._key = resolve_endpoint(cfg)

    def params(self, seed: int) -> dict[str, Any]:
        """Sampling parameters of one request (part of its cache key)."""
        return {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens, "seed": seed}

    def ask_all(self, requests: list[TeacherRequest], reporter: Reporter | None = None) -> dict[str, Answer]:
        """Answer every request: from the cache where it has the key, else from the endpoint."""
        answers: dict[str, Answer] = {}
        todo: dict[str, TeacherRequest] = {}
        tick = _Ticker(reporter, len(requests))
        for req in requests:
            hit = self.cache.get(req.key)
            if hit is not None:
                answers[req.key] = Answer.from_cache(hit)
                tick(answers[req.key])
            else:
                todo.setdefault(req.key, req)
        if todo:
            answers.update(asyncio.run(self._send(list(todo.values()), tick)))
        tick.done()
        return answers

    async def _send(self, todo: list[TeacherRequest], tick: _Ticker) -> dict[str, Answer]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=self.base_url, api_key=self._key, max_retries=self.cfg.max_attempts - 1,
                             timeout=self.cfg.timeout_s)
        gate = asyncio.Semaphore(self.cfg.concurrency)

        async def one(req: TeacherRequest) -> tuple[str, Answer]:
            async with gate:
                answer = await self._ask(client, req)
            if answer.error is None:
                self.cache.put(req.key, answer.to_cache())  # on arrival: a kill -9 later loses nothing answered
            tick(answer)
            return req.key, answer

        try:
            return dict(await asyncio.gather(*(one(r) for r in todo)))
        finally:
            await client.close()

    async def _ask(self, client: Any, req: TeacherRequest) -> Answer:
        import openai

        try:
            raw = await client.chat.completions.with_raw_response.create(model=self.model, messages=req.messages, **req.params)
            retries = int(raw.http_request.headers.get("x-stainless-retry-count", "0") or 0)
            done = raw.parse()
        except openai.APIStatusError as exc:
            return Answer(None, error=f"HTTP {exc.status_code} after {self.cfg.max_attempts} attempt(s): {_short(exc.message)}")
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            return Answer(None, error=f"{type(exc).__name__} after {self.cfg.max_attempts} attempt(s): {_short(str(exc))}")
        except openai.OpenAIError as exc:  # e.g. a 200 whose body is not a chat completion
            return Answer(None, error=f"{type(exc).__name__}: {_short(str(exc))}")
        if not hasattr(done, "choices"):  # e.g. an HTML page served with status 200: the client hands back text
            return Answer(None, retries=retries, error=f"not a chat completion (got {_short(str(done), 80)!r})")
        if not done.choices:
            return Answer(None, retries=retries, error="the answer has no choices")
        message, usage = done.choices[0].message, done.usage
        return Answer(message.content, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0,
                      retries, refusal=getattr(message, "refusal", None))


class _Ticker:
    """Counts answers as they arrive (cached ones too) and reports each: the bar or log line of `microtune synth`."""

    def __init__(self, reporter: Reporter | None, total: int):
        self.emit, self.total, self.n, self.cached = emitter(reporter, "synth"), total, 0, 0
        self.emit("start", 0, total)

    def __call__(self, answer: Answer) -> None:
        self.n += 1
        self.cached += answer.cached
        self.emit("progress", self.n, self.total, cached=self.cached)

    def done(self) -> None:
        self.emit("done", self.n, self.total, cached=self.cached)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

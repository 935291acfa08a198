"""The OpenAI request bodies microtune accepts, and the response/error bodies it writes.

Every field official OpenAI clients send is known; a value the server does not implement is refused with
a 400 that says so (the routes check them: ``unsupported``), and a field outside the spec is a 422 naming
it (``extra="forbid"``), so no option is silently ignored. Accepted and honoured or harmless: ``user``,
``metadata``, ``store`` (nothing is stored), ``service_tier``, ``parallel_tool_calls``, ``seed``, ``n`` 1,
penalties 0, an empty ``logit_bias``, ``tool_choice`` none/auto without tools, ``response_format`` text (JSON
formats on the base model and extract models: see the routes).
Errors follow OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
             504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"] = Field(description="Only text parts are served.")
    text: str = Field(description="The text.")


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who speaks.")
    content: str | list[TextPart] = Field(description="The message text (or text parts).")
    name: str | None = Field(None, description="Optional speaker name (kept out of the prompt, as the chat template has no slot).")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(description="text everywhere; JSON formats: see the routes.")
    json_schema: dict[str, Any] | None = Field(None, description="The schema of a json_schema answer.")


class Sampling(Strict):
    model: str = Field(description="A micro-model (`name`, `name@alias`, `name/version`) or the base model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (the server caps it).")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy. classify models accept only 0.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (with temperature > 0).")
    n: Literal[1] = Field(1, description="Choices per request: only 1.")
    stream: bool = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    stop: str | list[str] | None = Field(None, description="Stop sequences (up to 4).")
    seed: int | None = Field(None, description="Seed for sampling.")
    user: str | None = Field(None, description="End-user id (accepted; not stored).")
    metadata: dict[str, str] | None = Field(None, description="Request tags (accepted; not stored).")
    store: bool | None = Field(None, description="OpenAI stores completions for distillation; this server stores nothing.")
    service_tier: str | None = Field(None, max_length=32, description="Accepted; one tier here.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0: penalties are not implemented.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0: penalties are not implemented.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty: token biases are not implemented.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; micro-models call no tools.")
    tools: list[dict[str, Any]] | None = Field(None, description="Only empty: micro-models do not call tools.")
    tool_choice: Literal["none", "auto"] | dict[str, Any] | None = Field(None, description="none/auto (there are no tools).")
    response_format: ResponseFormat | None = Field(None, description="text; JSON: base model, extract models (see the routes).")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, description="The conversation; for classify models the last user message is the input.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    logprobs: bool | None = Field(None, description="classify: the answer's log-probability (sent unless false).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="classify: the most probable answers with their log-probabilities.")

    def top_k(self) -> int:
        return self.top_logprobs or 0


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(description="The prompt (one); for classify models the text to classify.")
    echo: Literal[False] = Field(False, description="Only false: the prompt is not echoed.")
    suffix: None = Field(None, description="Only null: no insertion mode.")
    best_of: Literal[1] = Field(1, description="Only 1.")
    logprobs: int | None = Field(None, ge=0, le=20, description="classify: the most probable answers with their log-probabilities.")

    def top_k(self) -> int:
        return self.logprobs or 0

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request, got {len(self.prompt)}", "prompt")
            return self.prompt[0]
        return self.prompt


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _lp(prob: float) -> float:
    return math.log(max(prob, 1e-300))


def label_logprobs(label: str, prob: float, top: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """The answer's probability in chat's logprobs shape: one entry, the whole answer as its "token"; ``top``: the most
    probable answers with their log-probabilities (``LabelPredictor.answer_logprobs``)."""
    alternatives = [{"token": a, "logprob": lp, "bytes": list(a.encode())} for a, lp in top or []]
    return {"content": [{"token": label, "logprob": _lp(prob), "bytes": list(label.encode()), "top_logprobs": alternatives}]}


def completion_logprobs(label: str, prob: float, top: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """The same in /v1/completions' (legacy) shape: tokens, token_logprobs, top_logprobs (answer → log-probability), offsets."""
    return {"tokens": [label], "token_logprobs": [_lp(prob)], "top_logprobs": [dict(top)] if top is not None else None, "text_offset": [0]}


def envelope(kind: str, model: str, fingerprint: str | None) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": new_id(prefix), "object": kind, "created": int(time.time()), "model": model, "system_fingerprint": fingerprint}

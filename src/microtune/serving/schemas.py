"""The OpenAI request bodies microtune accepts, and the response/error bodies it writes.

Fields the server does not implement are refused (``extra="forbid"`` → 422 naming the field), so no
option is silently ignored. Errors follow OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
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

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

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


class Sampling(Strict):
    model: str = Field(description="A micro-model (`name`, `name@alias`, `name/version`) or the base model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (the server caps it).")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy. classify models accept only 0.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (with temperature > 0).")
    n: Literal[1] = Field(1, description="Choices per request: only 1.")
    stream: bool = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    stop: str | list[str] | None = Field(None, description="Stop sequences (up to 4), not with stream.")
    seed: int | None = Field(None, description="Seed for sampling.")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, description="The conversation; for classify models the last user message is the input.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(description="The prompt (one); for classify models the text to classify.")

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


def label_logprobs(label: str, prob: float) -> dict[str, Any]:
    """The label's probability in OpenAI's logprobs shape (one entry: the whole label)."""
    return {"content": [{"token": label, "logprob": math.log(max(prob, 1e-300)), "bytes": list(label.encode()), "top_logprobs": []}]}


def envelope(kind: str, model: str, fingerprint: str | None) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": new_id(prefix), "object": kind, "created": int(time.time()), "model": model, "system_fingerprint": fingerprint}

"""An OpenAI-compatible chat endpoint as one more evaluated system (the "bigger generalist" comparison).

    client = EndpointSystem(cfg, labels)           # cfg: one recipe `eval.endpoints` entry
    answers = client.predict(list_of_messages)      # [EndpointAnswer(pred, raw, seconds, tokens...)]

Each test row is sent as the zero-shot prompt (instruction + label list + text) through the official
`openai` client, one request at a time at temperature 0, so each request's time is that row's latency.
The answer is mapped to the label set: exact match, then case- and space-normalised match; anything
else is an invalid answer (counted by ``valid_rate``, scored as wrong). The API key is read from the
environment variable the recipe names and never written anywhere.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from microtune.config import EndpointConfig
from microtune.core.errors import ModelError


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def match_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label the answer names: exact match first, then case/space-normalised; else ``None``."""
    if answer in labels:
        return answer
    normalised = {_norm(label): label for label in labels}
    return normalised.get(_norm(answer))


@dataclass
class EndpointAnswer:
    pred: Any
    raw: str
    seconds: float
    prompt_tokens: int
    completion_tokens: int


class EndpointSystem:
    def __init__(self, cfg: EndpointConfig, labels: Sequence[str], where: str = "eval.endpoints",
                 parse: Callable[[str], Any] | None = None):
        """``parse`` maps the raw answer to a prediction; default: ``match_label`` over ``labels`` (classify)."""
        import openai

        self.cfg, self.labels, self.where = cfg, list(labels), where
        self.parse = parse or (lambda raw: match_label(raw, self.labels))
        key = "not-needed"  # local servers (vLLM, llama.cpp, microtune serve) accept any key
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env, "")
            if not key:
                raise ModelError(f"{where}.api_key_env: environment variable {cfg.api_key_env!r} is not set (endpoint {cfg.name!r})",
                                 hint=f"export {cfg.api_key_env}=<your key>, or drop api_key_env for a server without keys")
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=1)

    def predict(self, conversations: Sequence[list[dict[str, str]]]) -> list[EndpointAnswer]:
        return [self._ask(messages) for messages in conversations]

    def _ask(self, messages: list[dict[str, str]]) -> EndpointAnswer:
        import openai

        start = time.perf_counter()
        try:
            reply = self.client.chat.completions.create(model=self.cfg.model, messages=messages,  # type: ignore[arg-type]
                                                        temperature=0, max_tokens=self.cfg.max_tokens)
        except openai.APIError as exc:  # connection, auth, missing model: the recipe points somewhere wrong
            raise ModelError(f"{self.where} {self.cfg.name!r}: request to {self.cfg.base_url} failed: {type(exc).__name__}: "
                             f"{_safe(str(exc))}", hint="check base_url and model, that the server is running, and the API key") from None
        seconds = time.perf_counter() - start
        raw = (reply.choices[0].message.content or "") if reply.choices else ""
        usage = reply.usage
        return EndpointAnswer(self.parse(raw), raw, seconds,
                              usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)

    def cost_per_1k(self, answers: Sequence[EndpointAnswer]) -> dict[str, object]:
        """USD per 1,000 predictions from the measured token usage and the recipe's stated prices."""
        cfg = self.cfg
        if cfg.usd_per_1m_input_tokens is None and cfg.usd_per_1m_output_tokens is None:
            return {"usd_per_1k": None, "basis": f"no token prices stated for endpoint {cfg.name!r}"}
        n = max(len(answers), 1)
        tokens_in = sum(a.prompt_tokens for a in answers) / n
        tokens_out = sum(a.completion_tokens for a in answers) / n
        usd = 1000 * (tokens_in * (cfg.usd_per_1m_input_tokens or 0) + tokens_out * (cfg.usd_per_1m_output_tokens or 0)) / 1e6
        return {"usd_per_1k": usd, "basis": f"measured {tokens_in:.0f} input + {tokens_out:.1f} output tokens per prediction at "
                f"${cfg.usd_per_1m_input_tokens or 0}/M input, ${cfg.usd_per_1m_output_tokens or 0}/M output (stated in the recipe)"}


def _safe(text: str) -> str:
    """Error text without anything that looks like a bearer key (servers sometimes echo it back)."""
    return re.sub(r"(sk-|Bearer\s+)[A-Za-z0-9_\-]{6,}", r"\1***", text)[:300]

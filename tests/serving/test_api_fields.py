"""The OpenAI fields clients send (official `openai` client), classify log-probabilities, hardening, load shedding."""
from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Any

import openai
import pytest

from microtune.serving import ServeSettings, build_app
from serve_helpers import Running, call, held_app, wait_for, write_recipe
from toydata import LABELS


@pytest.fixture(scope="module")
def topic(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from microtune import pipeline

    root = tmp_path_factory.mktemp("fields")
    return pipeline.train(write_recipe(root / "topic", "topic", tiny_model_dir, False, train={"max_steps": 4}), workspace=root / "ws")


@pytest.fixture(scope="module")
def server(topic: Path) -> Running:
    settings = ServeSettings(adapters={"topic": topic}, registry=False, bf16=False, max_body_bytes=20_000, max_tokens=32)
    with Running(build_app(settings, api_keys=[])) as srv:
        yield srv


def client(srv: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


MSGS = [{"role": "user", "content": "where is my parcel"}]


# -- fields ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fields_clients_send_are_accepted_at_their_neutral_values(server: Running, tiny_model_dir: Path) -> None:
    c = client(server)
    common: dict[str, Any] = {"user": "u-1", "metadata": {"team": "support"}, "store": False, "seed": 7, "n": 1,
                              "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "service_tier": "auto",
                              "response_format": {"type": "text"}}
    r = c.chat.completions.create(model="topic", messages=MSGS, parallel_tool_calls=False, tool_choice="none", **common)
    assert r.choices[0].message.content in LABELS
    r = c.chat.completions.create(model="topic", messages=MSGS, tool_choice="auto", stream=True, stream_options={"include_usage": True},
                                  **common)
    assert "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices) in LABELS
    legacy = {k: common[k] for k in ("user", "seed", "n", "presence_penalty", "frequency_penalty", "logit_bias")}  # what the client's
    done = c.completions.create(model="topic", prompt="where is my parcel", echo=False, suffix=None, best_of=1, **legacy)  # legacy API has
    assert done.choices[0].text in LABELS
    base = c.chat.completions.create(model=str(tiny_model_dir), messages=MSGS, max_tokens=3, stop=["zzz"], **common)
    assert base.usage.completion_tokens <= 3


@pytest.mark.slow
def test_fields_with_values_the_server_does_not_implement_are_400_naming_the_field(server: Running, tiny_model_dir: Path) -> None:
    c, base = client(server), str(tiny_model_dir)
    cases = [({"presence_penalty": 0.5}, "presence_penalty", "penalties are not implemented"),
             ({"frequency_penalty": -1}, "frequency_penalty", "penalties are not implemented"),
             ({"logit_bias": {"42": 5}}, "logit_bias", "token biases are not implemented"),
             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "micro-models do not call tools"),
             ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "do not call tools"),
             ({"response_format": {"type": "json_object"}}, "response_format", "answers a label"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format", "not JSON")]
    for extra, param, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="topic", messages=MSGS, **extra)
        err = info.value.body
        assert (info.value.status_code, err["param"]) == (400, param) and words in err["message"], extra
    with pytest.raises(openai.BadRequestError) as info:  # json_schema without a schema: said, not ignored
        c.chat.completions.create(model=base, messages=MSGS, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert (info.value.body["param"], info.value.body["code"]) == ("response_format", "invalid_value")
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=base, messages=MSGS, logprobs=True, top_logprobs=2)
    assert info.value.body["param"] == "logprobs"
    for body in ({"model": "topic", "messages": MSGS, "unknown_field": 1}, {"model": "topic", "messages": MSGS, "n": 2},
                 {"model": "topic", "prompt": "x", "echo": True}, {"model": "topic", "prompt": "x", "best_of": 3}):
        route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert call("POST", server.url + route, body)[0] == 422, body


@pytest.mark.slow
def test_classify_logprobs_list_the_most_probable_answers(server: Running) -> None:
    c = client(server)
    r = c.chat.completions.create(model="topic", messages=MSGS, logprobs=True, top_logprobs=3)
    entry = r.choices[0].logprobs.content[0]
    top = entry.top_logprobs
    assert [t.token for t in top] and sorted(t.token for t in top) == sorted(LABELS)
    assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
    assert sum(math.exp(t.logprob) for t in top) == pytest.approx(1.0, rel=1e-4)  # a distribution over the answers
    assert dict((t.token, t.logprob) for t in top)[entry.token] == pytest.approx(entry.logprob, abs=1e-4)
    assert c.chat.completions.create(model="topic", messages=MSGS, logprobs=False).choices[0].logprobs is None
    assert len(c.chat.completions.create(model="topic", messages=MSGS, logprobs=True, top_logprobs=1).choices[0].logprobs.content[0]
               .top_logprobs) == 1
    legacy = c.completions.create(model="topic", prompt="where is my parcel", logprobs=2).choices[0].logprobs
    assert legacy.tokens == [entry.token] and legacy.token_logprobs[0] == pytest.approx(entry.logprob, abs=1e-4)
    assert len(legacy.top_logprobs[0]) == 2 and legacy.top_logprobs[0][entry.token] == pytest.approx(entry.logprob, abs=1e-4)


# -- hardening ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_classify_prompt_longer_than_the_trained_length_is_refused_not_cut(server: Running) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="topic", messages=[{"role": "user", "content": "parcel " * 200}])
    err = info.value.body
    assert err["code"] == "context_length_exceeded" and "max_seq_len" in err["message"] and "96" in err["message"]


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(server: Running) -> None:
    """The client sends 25 KB of a body that never ends (no Content-Length, chunked); the server answers 413 anyway:
    it counted the bytes as they came in instead of waiting for the whole body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 1024
        for _ in range(25):
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"request_too_large" in body and b"over 20000 bytes" in body


@pytest.mark.slow
def test_error_messages_quote_only_a_short_prefix_of_what_the_client_sent(server: Running) -> None:
    huge = "m" * 10_000
    status, body = call("POST", server.url + "/v1/chat/completions", {"model": huge, "messages": MSGS})
    assert status == 404 and len(body["error"]["message"]) < 400 and "mmm..." in body["error"]["message"]
    status, body = call("POST", server.url + "/v1/chat/completions", {"model": "topic", "messages": MSGS, "k" * 3000: 1})
    assert status == 422 and len(json.dumps(body)) < 600
    status, body = call("POST", server.url + "/v1/chat/completions", {"model": "topic" * 500, "messages": MSGS})
    assert status == 404 and len(body["error"]["message"]) < 400


# -- load shedding --------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_request_that_would_wait_past_its_timeout_is_shed_at_once_with_retry_after(topic: Path) -> None:
    """The engine's service-time estimate is primed (1 s per request) and 8 jobs wait: a new request's expected wait
    (8 s) is past the 5 s timeout, so it is answered 429 with Retry-After 3 at once; once the queue drained it is served."""
    import asyncio
    import urllib.error
    import urllib.request

    from microtune.serving.engine import Job

    settings = ServeSettings(adapters={"topic": topic}, registry=False, bf16=False, timeout_s=5)
    app, engine = held_app(settings, gate_open=False)
    with Running(app) as srv:
        engine.prime_service_time(1.0)
        loop = asyncio.new_event_loop()
        for _ in range(8):
            engine.queue.put_nowait(Job("classify", "topic", [1], loop, loop.create_future(), cancelled=True))
        assert engine.expected_wait() == pytest.approx(8.0)
        req = urllib.request.Request(srv.url + "/v1/completions", json.dumps({"model": "topic", "prompt": "where is my parcel"}).encode(),
                                     {"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 429 and info.value.headers["Retry-After"] == "3"
        err = json.loads(info.value.read())["error"]
        assert (err["code"], err["type"]) == ("overloaded", "rate_limit_error") and "5s timeout" in err["message"]
        metrics = call("GET", srv.url + "/metrics")[1]
        assert "microtune_shed_total 1.0" in metrics
        engine.gate.set()
        wait_for(lambda: engine.queue.qsize() == 0, "draining the queue")
        assert call("POST", srv.url + "/v1/completions", {"model": "topic", "prompt": "where is my parcel"})[0] == 200
        loop.close()

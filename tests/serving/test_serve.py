"""`microtune serve`: a real uvicorn server on 127.0.0.1, the official `openai` client, tiny trained adapters.

Covers the OpenAI routes (chat, completions, streaming, models), mixed-adapter batches equal to one
by one, the prompt of evaluation, every error status, auth, the LRU limit, metrics, the CLI,
the registry (name, alias, version), hot reload after a promotion and graceful shutdown on SIGTERM.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from typer.testing import CliRunner

from microtune.cli import app as cli_app
from microtune.serving import ServeSettings, build_app
from serve_helpers import Running, call, held_app, wait_for, write_recipe
from toydata import LABELS

TEXTS = ["where is my parcel", "refund my order please", "the invoice is wrong", "my card was charged twice",
         "delivery is late", "i want my money back"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Two adapters trained briefly on the tiny model: `topic` (3 labels) and `route` (2 other labels)."""
    from microtune import pipeline

    root = tmp_path_factory.mktemp("serve")
    return {name: pipeline.train(write_recipe(root / name, name, tiny_model_dir, coarse), workspace=root / "ws")
            for name, coarse in (("topic", False), ("route", True))}


def settings(adapters: dict[str, Path], **kw: Any) -> ServeSettings:
    return ServeSettings(adapters=adapters, registry=False, bf16=False, **kw)


@pytest.fixture(scope="module")
def server(adapters: dict[str, Path]) -> Running:
    with Running(build_app(settings(adapters, batch_window_ms=20, max_tokens=64, max_body_bytes=4096), api_keys=[])) as srv:
        yield srv


def client(srv: Running, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def ask(c: openai.OpenAI, model: str, text: str) -> Any:
    return c.chat.completions.create(model=model, messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": text}])


# -- the OpenAI routes ----------------------------------------------------------------------------
@pytest.mark.slow
def test_openai_client_chat_and_completions_answer_a_label_with_its_probability(server: Running, tiny_model_dir: Path) -> None:
    c = client(server)
    assert sorted(m.id for m in c.models.list()) == sorted([str(tiny_model_dir), "route", "topic"])
    r = ask(c, "topic", "where is my parcel")
    label = r.choices[0].message.content
    assert label in LABELS and r.choices[0].finish_reason == "stop" and r.system_fingerprint == "topic@path"
    prob = r.model_extra["microtune"]["probability"]
    assert 0 < prob <= 1 and r.model_extra["microtune"]["label"] == label
    assert math.exp(r.choices[0].logprobs.content[0].logprob) == pytest.approx(prob)
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens >= 2
    done = c.completions.create(model="route", prompt="refund my order please")
    assert done.choices[0].text in {"money", "parcel"}


@pytest.mark.slow
def test_streaming_gives_the_same_answer_as_a_plain_request(server: Running) -> None:
    c = client(server)
    plain = ask(c, "topic", "the invoice is wrong").choices[0].message.content
    chunks = list(c.chat.completions.create(model="topic", messages=[{"role": "user", "content": "the invoice is wrong"}], stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 2
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="route", prompt="delivery is late", stream=True))
    assert streamed == c.completions.create(model="route", prompt="delivery is late").choices[0].text


@pytest.mark.slow
def test_base_model_generates_and_streams_the_same_greedy_text(server: Running, tiny_model_dir: Path) -> None:
    c, base = client(server), str(tiny_model_dir)
    msgs = [{"role": "user", "content": "hello there"}]
    plain = c.chat.completions.create(model=base, messages=msgs, max_tokens=12)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 12 and plain.choices[0].message.content
    streamed = c.chat.completions.create(model=base, messages=msgs, max_tokens=12, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == plain.choices[0].message.content
    text = c.completions.create(model=base, prompt="Once upon a time", max_tokens=6)
    assert text.usage.completion_tokens == 6 and text.choices[0].text


@pytest.mark.slow
def test_classify_answer_equals_the_evaluation_prompt_through_load_trained(server: Running, adapters: dict[str, Path],
                                                                           tiny_model_dir: Path) -> None:
    """The server builds the micro prompt exactly as evaluation does (trained instruction + text, no label list)."""
    from microtune.config import validate_recipe
    from microtune.core.artifacts import read_json
    from microtune.models import BaseModelRef, LabelPredictor, load_tokenizer, load_trained
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    recipe = validate_recipe(read_json(adapters["topic"] / "recipe.json"))
    ref = BaseModelRef(str(tiny_model_dir), str(tiny_model_dir), str(tiny_model_dir), "x")
    renderer, task = Renderer(load_tokenizer(ref)), get_task(recipe.task, LABELS)
    prompts = [renderer.encode(task.messages({"text": t, "label": "refund"}), "refund", recipe.train.max_seq_len)[0] for t in TEXTS]
    expected = LabelPredictor(load_trained(ref, adapters["topic"]), renderer, task.candidates()).predict(prompts)
    for text, (label, prob) in zip(TEXTS, expected):
        r = ask(client(server), "topic", text)
        assert r.choices[0].message.content == label
        assert r.model_extra["microtune"]["probability"] == pytest.approx(prob, rel=1e-4)


# -- batching -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mixed_adapter_batch_equals_each_adapter_alone(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    """One forward pass with rows for different adapters (PEFT adapter_names) = each row on its own single-adapter model."""
    from peft import PeftModel

    from microtune.config import validate_recipe
    from microtune.core.artifacts import read_json, read_manifest
    from microtune.models import BaseModelRef, LabelPredictor, build_trie, load_model, load_tokenizer, load_trained
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    ref = BaseModelRef(str(tiny_model_dir), str(tiny_model_dir), str(tiny_model_dir), "x")
    renderer = Renderer(load_tokenizer(ref))
    mixed = PeftModel.from_pretrained(load_model(ref), str(adapters["topic"]), adapter_name="topic")
    mixed.load_adapter(str(adapters["route"]), adapter_name="route")
    rows, names, tries, alone = [], [], [], []
    for i, text in enumerate(TEXTS):
        name = ("topic", "route")[i % 2]
        recipe = validate_recipe(read_json(adapters[name] / "recipe.json"))
        labels = read_manifest(adapters[name], "adapter")["labels"]
        task = get_task(recipe.task, labels)
        prompt = renderer.encode(task.messages({"text": text}), labels[0], 96)[0]
        rows.append(prompt), names.append(name), tries.append(build_trie({l: renderer.completion_ids(l) for l in labels}))
        alone.append(LabelPredictor(load_trained(ref, adapters[name]), renderer, labels).predict([prompt])[0])
    together = LabelPredictor(mixed.eval(), renderer, [], batch_size=8).predict(rows, adapter_names=names, tries=tries)
    assert {label for label, _ in together} & {"money", "parcel"} and {label for label, _ in together} & set(LABELS)
    for (label, prob), (want, want_prob) in zip(together, alone):
        assert label == want
        assert prob == pytest.approx(want_prob, rel=1e-4)


def _concurrently(fn: Any, args: list[Any]) -> list[Any]:
    out: list[Any] = [None] * len(args)

    def run(i: int) -> None:
        out[i] = fn(args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _metric(srv: Running, name: str) -> float:
    text = call("GET", srv.url + "/metrics")[1]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.slow
def test_concurrent_requests_for_two_adapters_share_batches_and_match_sequential_answers(adapters: dict[str, Path], server: Running) -> None:
    jobs = [(("topic", "route")[i % 2], TEXTS[i % len(TEXTS)]) for i in range(8)]
    sequential = [ask(client(server), m, t).choices[0].message.content for m, t in jobs]
    app, engine = held_app(settings(adapters), gate_open=False)  # the worker waits until all 8 requests are queued
    with Running(app) as srv:
        c = client(srv)
        answers: list[Any] = []
        asking = threading.Thread(target=lambda: answers.extend(_concurrently(lambda job: ask(c, *job).choices[0].message.content, jobs)))
        asking.start()
        wait_for(lambda: call("GET", srv.url + "/health")[1]["queue"] == len(jobs), "queueing all 8 requests")
        engine.gate.set()
        asking.join()
        batches = _metric(srv, 'microtune_batch_size_count{kind="classify"}')
    assert answers == sequential
    assert batches == 1  # all 8 requests, of both adapters, in one mixed-adapter batch


@pytest.mark.slow
def test_lru_limit_unloads_and_reloads_adapters_with_the_same_answers(adapters: dict[str, Path], server: Running) -> None:
    expected = {(m, t): ask(client(server), m, t).choices[0].message.content for m in ("topic", "route") for t in TEXTS[:2]}
    with Running(build_app(settings(adapters, max_loaded=1), api_keys=[])) as srv:
        c = client(srv)
        for _ in range(2):
            for (m, t), want in expected.items():
                assert ask(c, m, t).choices[0].message.content == want
        mixed = _concurrently(lambda job: ask(c, *job).choices[0].message.content, list(expected))
        assert mixed == list(expected.values())  # a batch needing 2 adapters with room for 1 is split, not failed
        assert call("GET", srv.url + "/health")[1]["adapters_loaded"] == 1
        assert _metric(srv, 'microtune_adapter_events_total{event="evict"}') >= 3


# -- errors, limits, auth -------------------------------------------------------------------------
def _error(srv: Running, path: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    status, data = call("POST" if body is not None or raw is not None else "GET", srv.url + path, body, headers, raw)
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    return status, data["error"]


@pytest.mark.slow
def test_error_statuses_have_openai_bodies(server: Running, tiny_model_dir: Path) -> None:
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    assert _error(server, chat, raw=b"{not json")[0] == 400
    status, err = _error(server, chat, {"model": "topic", "messages": msgs, "functionz": []})
    assert (status, err["param"]) == (422, "functionz") and "Extra inputs" in err["message"]
    assert _error(server, chat, {"model": "topic", "messages": msgs, "n": 2})[0] == 422
    assert _error(server, chat, {"model": "topic", "messages": []})[0] == 422
    status, err = _error(server, chat, {"model": "nope", "messages": msgs})
    assert (status, err["code"], err["param"]) == (404, "model_not_found", "model") and "'nope'" in err["message"]
    for sneaky in ("../../etc/passwd", "topic/../route", "/tmp", "topic@../x"):
        assert _error(server, chat, {"model": sneaky, "messages": msgs})[0] == 404
    status, err = _error(server, chat, raw=json.dumps({"model": "topic", "messages": [{"role": "user", "content": "x" * 10_000}]}).encode())
    assert (status, err["code"]) == (413, "request_too_large")
    status, err = _error(server, chat, {"model": str(tiny_model_dir), "messages": msgs, "max_tokens": 65})
    assert (status, err["param"]) == (400, "max_tokens") and "at most 64" in err["message"]
    status, err = _error(server, chat, {"model": "topic", "messages": msgs, "temperature": 0.7})
    assert (status, err["param"]) == (400, "temperature")
    status, err = _error(server, chat, {"model": "topic", "messages": [{"role": "system", "content": "only a system turn"}]})
    assert (status, err["param"]) == (400, "messages")
    assert _error(server, "/v1/nothing-here")[0] == 404
    with pytest.raises(openai.NotFoundError):
        ask(client(server), "missing-model", "hi")
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="topic", messages=msgs, temperature=1.5)


@pytest.mark.slow
def test_full_queue_answers_429_and_the_queued_request_still_completes(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    app, engine = held_app(settings(adapters, max_queue=1, max_batch=1, batch_window_ms=0), hold_generations=True)
    with Running(app) as srv:
        stream = client(srv).chat.completions.create(model=str(tiny_model_dir), messages=[{"role": "user", "content": "go"}], stream=True)
        first = next(iter(stream))
        assert engine.holding.wait(60)  # the worker holds the generation until its client leaves
        queued: dict[str, Any] = {}
        waiting = threading.Thread(target=lambda: queued.update(r=call("POST", srv.url + "/v1/completions",
                                                                       {"model": "topic", "prompt": "where is my parcel"})))
        waiting.start()
        wait_for(lambda: call("GET", srv.url + "/health")[1]["queue"] == 1, "queueing the second request")
        status, err = _error(srv, "/v1/completions", {"model": "route", "prompt": "refund"})
        stream.close()  # the client leaves: the generation stops at its first token and the queued request runs
        waiting.join()
    assert first.choices[0].delta.role == "assistant"
    assert (status, err["code"], err["type"]) == (429, "queue_full", "rate_limit_error")
    assert queued["r"][0] == 200 and queued["r"][1]["choices"][0]["text"] in LABELS


@pytest.mark.slow
def test_request_past_its_timeout_answers_504(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    app, _ = held_app(settings(adapters, timeout_s=0.3), hold_generations=True)  # the generation cannot finish in time
    with Running(app) as srv:
        status, err = _error(srv, "/v1/completions", {"model": str(tiny_model_dir), "prompt": "go", "max_tokens": 200})
        assert (status, err["code"], err["type"]) == (504, "timeout", "timeout_error") and "0.3s timeout" in err["message"]
        assert _metric(srv, 'microtune_requests_total{route="/v1/completions",status="504"}') == 1


def test_503_while_the_base_model_cannot_be_loaded(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with Running(build_app(ServeSettings(base=str(broken), registry=False), api_keys=[]), wait_ready=False) as srv:
        deadline = time.monotonic() + 30
        while (health := call("GET", srv.url + "/health"))[1]["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health[0] == 503 and health[1]["status"] == "failed"
        status, err = _error(srv, "/v1/completions", {"model": str(broken), "prompt": "hi"})
        assert (status, err["code"]) == (503, "loading")


@pytest.mark.slow
def test_api_keys_guard_every_route_but_health(adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from microtune.serving import read_api_keys

    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nfile-key\n")
    monkeypatch.setenv("MICROTUNE_API_KEYS", "env-key, other")
    keys = read_api_keys(key_file)
    assert keys == ["env-key", "other", "file-key"]
    with Running(build_app(settings(adapters), api_keys=keys)) as srv:
        assert call("GET", srv.url + "/health")[0] == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/admin/reload"), ("POST", "/v1/completions")):
            status, body = call(method, srv.url + path, {} if method == "POST" else None)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", path
        assert call("GET", srv.url + "/v1/models", headers={"Authorization": "Basic file-key"})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            client(srv, "wrong").models.list()
        for key in keys:
            assert ask(client(srv, key), "topic", "where is my parcel").choices[0].message.content in LABELS


@pytest.mark.slow
def test_metrics_count_requests_latency_batches_and_queue(server: Running) -> None:
    ask(client(server), "topic", "delivery is late")
    text = call("GET", server.url + "/metrics")[1]
    assert 'microtune_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'microtune_request_seconds_bucket{le="0.005",route="/v1/chat/completions"}' in text
    assert 'microtune_batch_size_count{kind="classify"}' in text and "microtune_queue_depth 0.0" in text
    assert "microtune_adapters_loaded" in text


# -- the command ----------------------------------------------------------------------------------
def test_cli_refuses_bad_adapter_options_with_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", "--adapter", "no-equals-sign", "--adapter", "a=x", "--adapter", "a=y"])
    assert result.exit_code == 2
    assert "--adapter #1: expected NAME=PATH (got 'no-equals-sign')" in result.stderr
    assert "--adapter #3: the name is given twice (got 'a')" in result.stderr
    result = runner.invoke(cli_app, ["serve", "--adapter", f"a={tmp_path}"])
    assert result.exit_code == 2 and "is not a microtune adapter artifact" in result.stderr
    result = runner.invoke(cli_app, ["serve", "--api-key-file", str(tmp_path / "none.txt")])
    assert result.exit_code == 2 and "--api-key-file" in result.stderr


# -- registry, hot reload, shutdown ---------------------------------------------------------------
def _register(adapters: dict[str, Path], name: str, which: list[str]) -> tuple[Any, list[str]]:
    """Register the given adapters' MLflow runs as versions of model ``name`` in the adapters' workspace store."""
    from mlflow import MlflowClient

    from microtune.config import validate_recipe
    from microtune.core.artifacts import read_json, read_manifest
    from microtune.core.workspace import Workspace
    from microtune.registry import register_adapter

    ws = Workspace.at(adapters["topic"].parents[2])
    versions = []
    for key in which:
        recipe = validate_recipe(read_json(adapters[key] / "recipe.json")).model_copy(update={"name": name})
        versions.append(register_adapter(recipe, ws, read_manifest(adapters[key], "adapter")["mlflow_run_id"], {}))
    return MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri), versions


def _registry_server(adapters: dict[str, Path], tiny_model_dir: Path, poll_s: float) -> Running:
    from microtune.core.workspace import Workspace

    uri = Workspace.at(adapters["topic"].parents[2]).mlflow_uri
    return Running(build_app(ServeSettings(base=str(tiny_model_dir), tracking_uri=uri, poll_s=poll_s, bf16=False), api_keys=[]))


@pytest.mark.slow
def test_registry_names_resolve_and_a_promotion_is_served_without_restart(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    mlflow, (v1, v2) = _register(adapters, "hot", ["topic", "route"])
    with _registry_server(adapters, tiny_model_dir, poll_s=0.2) as srv:
        c = client(srv)
        assert "hot" in [m.id for m in c.models.list()]
        assert ask(c, "hot", "where is my parcel").system_fingerprint == f"hot/{v2}"  # no champion yet: the latest version
        assert ask(c, f"hot/{v1}", "where is my parcel").choices[0].message.content in LABELS
        assert ask(c, f"hot@v{v1}", "where is my parcel").system_fingerprint == f"hot/{v1}"  # the CLI's NAME@vN, as in predict/export
        with pytest.raises(openai.NotFoundError):
            ask(c, "hot@challenger", "hi")
        for version, labels in ((v1, LABELS), (v2, ["money", "parcel"])):
            mlflow.set_registered_model_alias("hot", "champion", version)
            deadline = time.monotonic() + 60  # a safety net: polling every 0.2 s picks it up long before
            while (r := ask(c, "hot", "where is my parcel")).system_fingerprint != f"hot/{version}":
                assert time.monotonic() < deadline, "the promotion was not picked up"
                time.sleep(0.1)
            assert r.choices[0].message.content in labels
            assert ask(c, "hot@champion", "refund please").system_fingerprint == f"hot/{version}"


@pytest.mark.slow
def test_admin_reload_moves_to_the_new_champion_at_once(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    mlflow, (v1, v2) = _register(adapters, "reloaded", ["topic", "route"])
    mlflow.set_registered_model_alias("reloaded", "champion", v1)
    with _registry_server(adapters, tiny_model_dir, poll_s=0) as srv:
        c = client(srv)
        assert ask(c, "reloaded", "where is my parcel").system_fingerprint == f"reloaded/{v1}"
        mlflow.set_registered_model_alias("reloaded", "champion", v2)
        assert ask(c, "reloaded", "where is my parcel").system_fingerprint == f"reloaded/{v1}"  # polling is off
        status, body = call("POST", srv.url + "/admin/reload", {})
        assert status == 200 and body["changes"] == [f"reloaded: reloaded/{v1} -> reloaded/{v2}"]
        r = ask(c, "reloaded", "where is my parcel")
        assert r.system_fingerprint == f"reloaded/{v2}" and r.choices[0].message.content in {"money", "parcel"}


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits(adapters: dict[str, Path]) -> None:
    """SIGTERM comes only once the server has taken all four requests (their response heads are back: streaming
    sends them before the answer), so none can be refused; the 800 ms batching window usually keeps them in flight,
    and either way every one must be answered in full."""
    import http.client
    import os
    import signal
    import subprocess
    import sys

    from serve_helpers import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "microtune.cli", "serve", "--adapter", f"topic={adapters['topic']}", "--port", str(port),
                             "--no-registry", "--batch-window-ms", "800"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if call("GET", url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(4)]
        for conn, text in zip(connections, TEXTS):
            conn.request("POST", "/v1/completions", json.dumps({"model": "topic", "prompt": text, "stream": True}),
                         {"Content-Type": "application/json"})
        responses = [conn.getresponse() for conn in connections]  # each head comes back once the server has the request
        proc.send_signal(signal.SIGTERM)
        results = [(r.status, [line.removeprefix("data: ") for line in r.read().decode().splitlines() if line.startswith("data: ")])
                   for r in responses]
        code = proc.wait(60)
        log = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [status for status, _ in results] == [200] * 4
    assert all(events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["text"] in LABELS for _, events in results)
    # uvicorn re-raises the captured SIGTERM once its graceful shutdown is done, so the exit status is -15, not a crash
    assert code == -signal.SIGTERM and "Finished server process" in log

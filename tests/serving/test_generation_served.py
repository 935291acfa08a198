"""`microtune serve` generates: extract and generate micro-models and the base model, through the continuous batch.

Tiny extract and generate models (a few training steps on the tiny model) of several methods: LoRA rows share the
shared base's running batch with the base model's own rows, DoRA gets a generator of its own on the shared base,
IA3 and prompt tuning their own instances. Every greedy answer equals eval's micro prediction for the same input;
requests join a running batch at a known step (the engine's test hooks, not the clock) and each stops at its own
end; streaming and ``response_format`` through the official ``openai`` client.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from microtune.serving import ServeSettings, build_app
from microtune.serving.catalog import BASE
from microtune.serving.engine import SHARED
from serve_helpers import Running, call, held_app, wait_for
from toydata import EXTRACT_FIELDS, EXTRACT_ROWS, GENERATE_ROWS, TINY_METHODS, extract_row, write_jsonl

EXTRACT_TEXTS = ["the juicer leaks juice everywhere", "where is my electric blanket", "the scale shows the wrong weight"]
GENERATE_TEXTS = ["the kettle arrived with a dent in the side and the lid does not close", "please send me a new invoice for my order"]
MODELS = {"ex-lora": ("extract", "lora"), "ex-ia3": ("extract", "ia3"), "gen-lora": ("generate", "lora"),
          "gen-prompt": ("generate", "prompt_tuning"), "gen-dora": ("generate", "dora")}


def write_gen_recipe(folder: Path, name: str, base: Path, task_type: str, method: dict[str, Any]) -> Path:
    """A toy extract or generate recipe (the toy rows of tests/toydata.py), short answers so the tiny model is quick."""
    folder.mkdir(parents=True, exist_ok=True)
    if task_type == "extract":
        rows = [extract_row(*r) for r in EXTRACT_ROWS]
        task = {"type": "extract", "instruction": "Extract the product and the problem.", "fields": EXTRACT_FIELDS, "max_new_tokens": 24}
    else:
        rows = [{"text": t, "target": s} for t, s in GENERATE_ROWS]
        task = {"type": "generate", "instruction": "Summarise the customer message for the agent.", "max_new_tokens": 12}
    write_jsonl(folder / "train.jsonl", rows[:-2])
    write_jsonl(folder / "test.jsonl", rows[-2:])
    recipe = {"name": name, "task": task, "method": method,
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}}, "model": {"base": str(base)},
              "train": {"epochs": 1, "batch_size": 4, "max_seq_len": 96, "lr": 2e-2, "seed": 3, "bf16": False, "max_steps": 3},
              "eval": {"shots": 1, "batch_size": 4, "baselines": []}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    from microtune import pipeline

    root = tmp_path_factory.mktemp("gen-served")
    return {name: pipeline.train(write_gen_recipe(root / name, name, tiny_model_dir, task_type, TINY_METHODS[kind]), workspace=root / "ws")
            for name, (task_type, kind) in MODELS.items()}


def eval_raw(adapter: Path, base: Path, texts: list[str]) -> list[str]:
    """Eval's raw micro answers (before ``task.parse``): the artifact as eval loads it, eval's prompt, eval's decoder."""
    from microtune.config import artifact_recipe
    from microtune.models import BaseModelRef, load_tokenizer, load_trained
    from microtune.models.generation import TextGenerator
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    recipe = artifact_recipe(adapter / "recipe.json")
    ref = BaseModelRef(str(base), str(base), str(base), "x")
    renderer = Renderer(load_tokenizer(ref))
    task = get_task(recipe.task, [])
    spec = task.decoder()
    prompts = [renderer.encode(task.messages({"text": t}), "", recipe.train.max_seq_len)[0] for t in texts]
    gen = TextGenerator(load_trained(ref, adapter), renderer, spec.max_new_tokens, schema=spec.schema if spec.kind == "json" else None)
    return [raw for raw, _ in gen.predict(prompts)]


def own_schema(adapter: Path) -> dict[str, Any]:
    from microtune.config import artifact_recipe
    from microtune.tasks import get_task

    return get_task(artifact_recipe(adapter / "recipe.json").task, []).decoder().schema


def _settings(models: dict[str, Path], **kw: Any) -> ServeSettings:
    return ServeSettings(adapters=models, registry=False, bf16=False, **kw)


def _client(srv: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def _texts(name: str) -> list[str]:
    return EXTRACT_TEXTS if MODELS[name][0] == "extract" else GENERATE_TEXTS


@pytest.mark.slow
def test_every_generation_in_one_running_batch_answers_what_eval_answers(trained: dict[str, Path], tiny_model_dir: Path) -> None:
    """Every request (5 micro-models of 2 task types and 4 methods, and the base model) is queued before the worker takes
    them: they are admitted together — LoRA rows and the base model's rows in the shared base's batch, DoRA and the own
    instances in theirs — and every greedy answer equals eval's (content = eval's raw answer, ``microtune.output`` = the
    answer as eval parses it)."""
    from microtune.config import artifact_recipe
    from microtune.tasks import get_task

    expected = {name: eval_raw(path, tiny_model_dir, _texts(name)) for name, path in trained.items()}
    jobs = [(name, i) for name in trained for i in range(len(_texts(name)))] + [("base", 0)]
    app, engine = held_app(_settings(trained, max_batch=64), gate_open=False)
    answers: dict[tuple[str, int], Any] = {}
    with Running(app) as srv:
        def ask(job: tuple[str, int]) -> None:
            model = str(tiny_model_dir) if job[0] == "base" else job[0]
            text = "hello" if job[0] == "base" else _texts(job[0])[job[1]]
            status, body = call("POST", srv.url + "/v1/chat/completions",
                                {"model": model, "messages": [{"role": "user", "content": text}], **({"max_tokens": 6} if job[0] == "base" else {})})
            assert status == 200, body
            answers[job] = body

        threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        wait_for(lambda: call("GET", srv.url + "/health")[1]["queue"] == len(jobs), "queueing every request")
        engine.gate.set()
        for t in threads:
            t.join()
    first = {key: sorted(j.adapter for j in js) for key, js in engine.rounds[0].items()}
    keys = {name: artifact_recipe(path / "recipe.json") for name, path in trained.items()}
    assert len(first[SHARED]) == len(EXTRACT_TEXTS) + len(GENERATE_TEXTS) + 1  # ex-lora, gen-lora and the base model: one batch
    assert len(engine.rounds[0]) == 4  # the shared base, DoRA alone, the IA3 and the prompt-tuning instances
    for (name, i), body in answers.items():
        if name == "base":
            assert body["usage"]["completion_tokens"] <= 6 and "microtune" not in body
            continue
        content, ext = body["choices"][0]["message"]["content"], body["microtune"]
        task = get_task(keys[name].task, [])
        assert content.strip() == expected[name][i], (name, i)
        assert ext["output"] == task.parse(expected[name][i]) and ext["task"] == MODELS[name][0]
        if MODELS[name][0] == "extract":
            assert set(json.loads(content)) == set(EXTRACT_FIELDS)  # constrained: always the schema's object


@pytest.mark.slow
def test_requests_join_a_running_batch_and_each_stops_at_its_own_end(trained: dict[str, Path], tiny_model_dir: Path) -> None:
    """A (10 tokens) runs alone for 2 step rounds; then B (3 tokens) and C (an extract model's answer) join A's running
    batch; B leaves after its 3 tokens while A goes on; every answer equals the same request asked alone."""
    base = str(tiny_model_dir)
    bodies = {"A": {"model": base, "prompt": "the parcel", "max_tokens": 10}, "B": {"model": base, "prompt": "refund me", "max_tokens": 3},
              "C": {"model": "ex-lora", "prompt": EXTRACT_TEXTS[0]}}
    app, engine = held_app(_settings(trained))
    engine.pause_after = 2
    out: dict[str, Any] = {}

    def ask(name: str) -> None:
        out[name] = call("POST", srv.url + "/v1/completions", bodies[name])

    with Running(app) as srv:
        first = threading.Thread(target=ask, args=("A",))
        first.start()
        assert engine.paused.wait(60)
        later = [threading.Thread(target=ask, args=(n,)) for n in ("B", "C")]
        for t in later:
            t.start()
        wait_for(lambda: engine.queue.qsize() == 2, "queueing B and C while A runs")
        engine.resume.set()
        for t in [first, *later]:
            t.join()
        rounds = list(engine.rounds)
        alone = {n: call("POST", srv.url + "/v1/completions", b) for n, b in bodies.items()}
    assert all(status == 200 for status, _ in [*out.values(), *alone.values()]), out
    running = [sorted(_name(j) for jobs in r.values() for j in jobs) for r in rounds]
    assert running[0] == running[1] == ["A"]
    assert ["A", "B", "C"] in running  # B and C joined A's running batch
    last_b = max(i for i, names in enumerate(running) if "B" in names)
    assert any("A" in names for names in running[last_b + 1:])  # A went on after B ended
    for name in bodies:
        (_, body), (_, ref) = out[name], alone[name]
        assert body["choices"][0]["text"] == ref["choices"][0]["text"] and body["usage"] == ref["usage"], name
        assert body["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
    assert out["B"][1]["usage"]["completion_tokens"] <= 3 and out["A"][1]["usage"]["completion_tokens"] <= 10


def _name(job: Any) -> str:
    """Which of A, B, C a running job is: C is the extract model's; A and B the base model's, told apart by max_tokens."""
    if job.adapter != BASE:
        return "C"
    return "A" if job.params["max_tokens"] == 10 else "B"


@pytest.mark.slow
def test_streaming_extract_generate_and_base_give_the_plain_answer(trained: dict[str, Path], tiny_model_dir: Path) -> None:
    """The official client's stream: the deltas join into the plain answer (greedy), the last chunk carries the finish
    reason (and, for a micro-model, the `microtune` field); stop strings work while streaming."""
    with Running(build_app(_settings(trained), api_keys=[])) as srv:
        c = _client(srv)
        for model, text in (("ex-lora", EXTRACT_TEXTS[1]), ("gen-prompt", GENERATE_TEXTS[0]), (str(tiny_model_dir), "hello there")):
            msgs = [{"role": "user", "content": text}]
            extra = {"max_tokens": 8} if model == str(tiny_model_dir) else {}
            plain = c.chat.completions.create(model=model, messages=msgs, **extra)
            chunks = list(c.chat.completions.create(model=model, messages=msgs, stream=True, stream_options={"include_usage": True}, **extra))
            streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert streamed == plain.choices[0].message.content, model
            last = [ch for ch in chunks if ch.choices][-1]
            assert last.choices[0].finish_reason == plain.choices[0].finish_reason
            assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
            if model != str(tiny_model_dir):
                assert last.model_extra["microtune"] == plain.model_extra["microtune"]
        plain = c.completions.create(model=str(tiny_model_dir), prompt="hello", max_tokens=8).choices[0].text
        assert len(plain) > 2
        stop = plain[1:3]  # a stop string inside the greedy answer: the stream ends before it
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=str(tiny_model_dir), prompt="hello", max_tokens=8,
                                                                             stop=[stop], stream=True))
        assert streamed == plain[: plain.index(stop)]


@pytest.mark.slow
def test_response_format_through_the_openai_client(trained: dict[str, Path], tiny_model_dir: Path) -> None:
    """Base model: json_object → a JSON object, json_schema → an object following the client's schema (even from a random
    model: the grammar constrains every token). Extract model: json_object and its own schema accepted, another schema
    refused; a generate model refuses JSON; max_tokens past the recipe's is refused, lower is honoured."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"],
              "additionalProperties": False}
    msgs = [{"role": "user", "content": "plan a trip"}]
    with Running(build_app(_settings(trained), api_keys=[])) as srv:
        c, base = _client(srv), str(tiny_model_dir)
        obj = c.chat.completions.create(model=base, messages=msgs, max_tokens=40, response_format={"type": "json_object"})
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
        strict = c.chat.completions.create(model=base, messages=msgs, max_tokens=40,
                                           response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}})
        answer = json.loads(strict.choices[0].message.content)
        assert list(answer) == ["city", "days"] and isinstance(answer["city"], str) and isinstance(answer["days"], int)
        ex = [{"role": "user", "content": EXTRACT_TEXTS[0]}]
        plain = c.chat.completions.create(model="ex-lora", messages=ex).choices[0].message.content
        as_object = c.chat.completions.create(model="ex-lora", messages=ex, response_format={"type": "json_object"})
        own = {"type": "json_schema", "json_schema": {"name": "x", "schema": own_schema(trained["ex-lora"]), "strict": True}}
        assert as_object.choices[0].message.content == plain == c.chat.completions.create(model="ex-lora", messages=ex,
                                                                                           response_format=own).choices[0].message.content
        cases = [("ex-lora", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, "schema_mismatch"),
                 ("gen-lora", {"response_format": {"type": "json_object"}}, "unsupported_parameter"),
                 ("ex-lora", {"stop": ["}"]}, "unsupported_parameter"),
                 ("gen-lora", {"max_tokens": 13}, "max_tokens_too_large")]
        for model, extra, code in cases:
            with pytest.raises(openai.BadRequestError) as info:
                c.chat.completions.create(model=model, messages=ex, **extra)
            assert info.value.body["code"] == code, (model, extra)
        short = c.chat.completions.create(model="gen-lora", messages=ex, max_tokens=2)
        assert short.usage.completion_tokens <= 2


@pytest.mark.slow
def test_an_instance_with_running_rows_is_not_evicted(trained: dict[str, Path]) -> None:
    """max_loaded=1: while the prompt-tuning instance has a running row, asking the IA3 model loads it beside the running
    one instead of evicting it (both answer what they answer alone); once idle, the least recently used goes as usual."""
    app, engine = held_app(_settings({"gen-prompt": trained["gen-prompt"], "ex-ia3": trained["ex-ia3"]}, max_loaded=1))
    engine.pause_after = 1
    out: dict[str, Any] = {}
    bodies = {"gen-prompt": {"model": "gen-prompt", "prompt": GENERATE_TEXTS[0]}, "ex-ia3": {"model": "ex-ia3", "prompt": EXTRACT_TEXTS[0]}}

    def ask(name: str) -> None:
        out[name] = call("POST", srv.url + "/v1/completions", bodies[name])

    with Running(app) as srv:
        threads = [threading.Thread(target=ask, args=("gen-prompt",))]
        threads[0].start()
        assert engine.paused.wait(60)
        threads.append(threading.Thread(target=ask, args=("ex-ia3",)))
        threads[1].start()
        wait_for(lambda: engine.queue.qsize() == 1, "queueing the IA3 request")
        engine.resume.set()
        for t in threads:
            t.join()
        together = max(len(r) for r in engine.rounds)
        after = [e["model"] for e in call("GET", srv.url + "/health")[1]["loaded"]]
        alone = {n: call("POST", srv.url + "/v1/completions", b)[1]["choices"][0]["text"] for n, b in bodies.items()}
    assert together == 2  # both instances generated in the same rounds: neither was evicted while it ran
    assert {n: r[1]["choices"][0]["text"] for n, r in out.items()} == alone
    assert after == ["gen-prompt@path", "ex-ia3@path"]  # over max_loaded while it ran: the running instance stayed loaded

"""`microtune serve` serves every fine-tuning method and every classify variant, each answering what `eval` answers.

Tiny adapters of each method (a few training steps on the tiny model), one server for all of them: requests for
every method arrive in one batch and are grouped by model instance (the shared base with its LoRA adapters mixed
per row, DoRA alone on the shared base, IA3/prompt/prefix tuning/full on instances of their own). Also: the PEFT
facts the placement rests on, the one memory budget evicting a whole model, multi-label and none_label answers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from microtune.serving import ServeSettings, build_app
from serve_helpers import Running, agreement_with_eval, call, eval_answers, held_app, wait_for, write_recipe
from toydata import TINY_METHODS

TEXTS = ["where is my parcel", "refund my order please", "the invoice is wrong", "my card was charged twice",
         "delivery is late", "tell me a joke"]
KINDS = ["lora", "rslora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full"]
SECTIONS = TINY_METHODS | {"rslora": {"kind": "lora", "r": 4, "use_rslora": True}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """One adapter per method (3 steps each: the answers need only be what eval answers, not good), plus a
    multi-label and a none_label classify model (LoRA)."""
    from microtune import pipeline

    root = tmp_path_factory.mktemp("methods")
    out = {kind: pipeline.train(write_recipe(root / kind, kind.replace("_", "-"), tiny_model_dir, False, SECTIONS[kind],
                                             train={"max_steps": 3}), workspace=root / "ws")
           for kind in KINDS}
    for variant in ("multi", "oos"):
        out[variant] = pipeline.train(write_recipe(root / variant, variant, tiny_model_dir, False, variant=variant), workspace=root / "ws")
    return out


def _settings(models: dict[str, Path], **kw: Any) -> ServeSettings:
    return ServeSettings(adapters=models, registry=False, bf16=False, **kw)


def _ask(url: str, model: str, text: str, **extra: Any) -> dict[str, Any]:
    status, body = call("POST", url + "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}], **extra})
    assert status == 200, body
    return body


def _metric(srv: Running, name: str) -> float:
    text = call("GET", srv.url + "/metrics")[1]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.slow
def test_every_method_in_one_batch_answers_what_eval_answers(trained: dict[str, Path], tiny_model_dir: Path) -> None:
    """All 8 methods' requests are queued before the worker takes them: one batch, grouped by model instance, and every
    answer (label and probability) equals eval's predictor on the same artifact — qlora here on the full-precision base,
    so its reference is the adapter on that base (its 4-bit evaluation: the agreement test below)."""
    from peft import PeftModel

    from microtune.models import BaseModelRef, load_model

    models = {k: trained[k] for k in KINDS}
    ref = BaseModelRef(str(tiny_model_dir), str(tiny_model_dir), str(tiny_model_dir), "x")
    expected = {k: eval_answers(p, tiny_model_dir, TEXTS) for k, p in models.items() if k != "qlora"}
    expected["qlora"] = eval_answers(models["qlora"], tiny_model_dir, TEXTS, PeftModel.from_pretrained(load_model(ref), str(models["qlora"])))
    jobs = [(k, i) for k in KINDS for i in range(len(TEXTS))]
    app, engine = held_app(_settings(models, max_batch=64), gate_open=False)
    with Running(app) as srv:
        import threading

        answers: dict[tuple[str, int], Any] = {}

        def ask(job: tuple[str, int]) -> None:
            answers[job] = _ask(srv.url, job[0], TEXTS[job[1]])

        threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        wait_for(lambda: call("GET", srv.url + "/health")[1]["queue"] == len(jobs), "queueing every request")
        engine.gate.set()
        for t in threads:
            t.join()
        batches = _metric(srv, 'microtune_batch_size_count{kind="classify"}')
        health = call("GET", srv.url + "/health")[1]
    assert batches == 1
    for (kind, i), body in answers.items():
        label, prob = expected[kind][i]
        assert body["choices"][0]["message"]["content"] == label, kind
        assert body["microtune"]["probability"] == pytest.approx(prob, rel=1e-3, abs=1e-5), kind
    places = {e["model"].removesuffix("@path"): e["placement"] for e in health["loaded"]}
    assert places == {"lora": "mixed", "rslora": "mixed", "qlora": "mixed", "dora": "alone", "ia3": "own", "prompt_tuning": "own",
                      "prefix_tuning": "own", "full": "own"}
    assert health["loaded_bytes"] == sum(e["bytes"] for e in health["loaded"]) > 0


@pytest.mark.slow
def test_qlora_on_its_4bit_base_answers_exactly_what_eval_answers_and_agreement_of_the_full_base_is_measured(
        trained: dict[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    from microtune import pipeline

    qlora = trained["qlora"]
    recipe = qlora.parents[3] / "qlora" / "recipe.yaml"  # <root>/qlora/recipe.yaml; the adapter is <root>/ws/qlora/adapters/<run>
    eval_dir = pipeline.evaluate(recipe, ["eval.baselines=[]"], workspace=qlora.parents[2], adapter=qlora)
    with Running(build_app(_settings({"q": qlora}, qlora_base="4bit"), api_keys=[])) as srv:
        assert agreement_with_eval(srv.url, "q", eval_dir) == 1.0  # the same 4-bit model as eval: every answer the same
        assert call("GET", srv.url + "/health")[1]["loaded"][0]["placement"] == "own"
    with Running(build_app(_settings({"q": qlora}), api_keys=[])) as srv:
        share = agreement_with_eval(srv.url, "q", eval_dir)  # the default: LoRA weights on the full-precision base
        assert 0.0 <= share <= 1.0 and call("GET", srv.url + "/health")[1]["loaded"][0]["placement"] == "mixed"


def test_peft_refuses_dora_rows_in_mixed_batches_but_not_a_dora_adapter_merely_loaded(trained: dict[str, Path], tiny_model_dir: Path) -> None:
    """Why DoRA runs alone on the shared base (installed PEFT): rows may not name it, but it may sit beside LoRA adapters,
    and with ``set_adapter`` it answers without ``adapter_names`` on the same model."""
    import torch
    from peft import PeftModel

    from microtune.models import BaseModelRef, load_model

    ref = BaseModelRef(str(tiny_model_dir), str(tiny_model_dir), str(tiny_model_dir), "x")
    shared = PeftModel.from_pretrained(load_model(ref), str(trained["lora"]), adapter_name="lora")
    shared.load_adapter(str(trained["dora"]), adapter_name="dora")
    shared.eval()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        shared(input_ids=ids, adapter_names=["lora", "__base__"])  # a DoRA adapter merely loaded: fine
        shared.set_adapter("dora")
        alone = shared(input_ids=ids).logits
        own = PeftModel.from_pretrained(load_model(ref), str(trained["dora"])).eval()(input_ids=ids).logits
        with pytest.raises(ValueError, match="DoRA"):  # last: PEFT leaves its per-row hooks behind when this raises
            shared(input_ids=ids, adapter_names=["lora", "dora"])
    assert torch.allclose(alone, own, atol=1e-5)


@pytest.mark.slow
def test_memory_budget_evicts_a_full_model_to_make_room(trained: dict[str, Path]) -> None:
    """A budget that holds one whole tiny model: asking the IA3 model (an instance of its own) evicts the full model
    (least recently used); asking the full model again brings it back with the same answer."""
    models = {"full": trained["full"], "ia3": trained["ia3"], "lora": trained["lora"]}
    with Running(build_app(_settings(models, max_memory_mb=20), api_keys=[])) as srv:
        first = _ask(srv.url, "full", TEXTS[0])["choices"][0]["message"]["content"]
        _ask(srv.url, "lora", TEXTS[0])
        loaded = call("GET", srv.url + "/health")[1]
        assert [e["model"] for e in loaded["loaded"]] == ["full@path", "lora@path"]
        full_bytes = loaded["loaded"][0]["bytes"]
        assert 10 * 2**20 < full_bytes < 20 * 2**20  # the tiny model's parameters (its tied embedding counted once)
        _ask(srv.url, "ia3", TEXTS[0])
        health = call("GET", srv.url + "/health")[1]
        assert [e["model"] for e in health["loaded"]] == ["lora@path", "ia3@path"]
        assert health["loaded_bytes"] <= health["max_memory_bytes"] == 20 * 2**20
        assert _metric(srv, 'microtune_adapter_events_total{event="evict"}') == 1
        assert _ask(srv.url, "full", TEXTS[0])["choices"][0]["message"]["content"] == first
        # the least recently used go first until the full model fits: lora (asked before ia3), then ia3
        assert [e["model"] for e in call("GET", srv.url + "/health")[1]["loaded"]] == ["full@path"]
        assert _metric(srv, 'microtune_adapter_events_total{event="evict"}') == 3
        assert _metric(srv, "microtune_loaded_bytes") == call("GET", srv.url + "/health")[1]["loaded_bytes"]


@pytest.mark.slow
def test_multi_label_and_none_label_models_answer_what_eval_answers(trained: dict[str, Path], tiny_model_dir: Path) -> None:
    from microtune.tasks.classify import JOIN

    models = {"multi": trained["multi"], "oos": trained["oos"]}
    with Running(build_app(_settings(models), api_keys=[])) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        for name, path in models.items():
            for text, (answer, prob) in zip(TEXTS, eval_answers(path, tiny_model_dir, TEXTS)):
                r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": text}])
                ext = r.model_extra["microtune"]
                assert r.choices[0].message.content == answer == ext["label"]
                assert ext["probability"] == pytest.approx(prob, rel=1e-3)
                if name == "multi":
                    assert ext["labels"] == answer.split(JOIN) and 1 <= len(ext["labels"]) <= 2
                else:
                    assert ext["labels"] == [answer] and ext["out_of_scope"] == (answer == "oos")
        # the multi-label decoder picks among label sets: top_logprobs lists them, and they are a distribution
        r = c.chat.completions.create(model="multi", messages=[{"role": "user", "content": TEXTS[1]}], logprobs=True, top_logprobs=20)
        top = r.choices[0].logprobs.content[0].top_logprobs
        assert len(top) == 6 and any(JOIN in t.token for t in top)  # 3 labels alone + 3 pairs
        assert sum(__import__("math").exp(t.logprob) for t in top) == pytest.approx(1.0, rel=1e-3)

"""The naive peer of benchmarks/serve_load.py: one request at a time, swapping the LoRA adapter per request.

    .venv/bin/python benchmarks/naive_lora_server.py --port 8101 --adapter NAME=PATH [--adapter ...] [--bf16 true]

The usual way to put several LoRA adapters behind one endpoint without a batching engine: every
adapter is loaded once into one PEFT model (no disk reads per request, to be fair to it), a lock
serves one request at a time, and each request activates its adapter (`set_adapter`) and answers
with the same micro prompt and decoder as microtune serve (and eval): classify with the constrained
label decoder; extract with microtune's `BatchGenerator` on a batch of one, constrained to the task's
JSON schema (`models.constrain.json_schema`); generate greedy with the same generator, unconstrained.
Extract/generate stop at the template's end of turn or eos, or at the request's ``max_tokens`` (default:
the recipe's ``task.max_new_tokens``). Only `POST /v1/chat/completions`; no auth, limits or streaming.
"""
from __future__ import annotations

import argparse
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI

from microtune.config import ModelConfig
from microtune.models import LabelPredictor, load_model, load_tokenizer, resolve_base
from microtune.models.constrain import json_schema
from microtune.models.generation import BatchGenerator, GenRequest
from microtune.models.hardware import device, use_bf16
from microtune.serving import parse_adapter_options
from microtune.serving.catalog import load_spec
from microtune.tasks import get_task
from microtune.tasks.render import Renderer


def build(adapters: dict[str, Any], bf16: bool) -> FastAPI:
    from peft import PeftModel

    specs = {}
    model = None
    for name, path in adapters.items():
        ref = resolve_base(ModelConfig(base=_base_of(path)))
        spec = load_spec(name, None, path, ref.path)  # the same metadata checks as microtune serve
        if model is None:
            tokenizer, model = load_tokenizer(ref), PeftModel.from_pretrained(load_model(ref).to(device()).eval(), str(path),
                                                                                adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
        specs[name] = spec
    model.eval()
    renderer, lock, app = Renderer(tokenizer), threading.Lock(), FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any]) -> dict[str, Any]:  # a plain def: FastAPI runs it in a thread; the lock serialises
        spec = specs[body["model"]]
        text = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        task = get_task(spec.recipe.task, spec.labels)
        if spec.recipe.task.type != "classify":
            return generate(spec, task, text, body.get("max_tokens"))
        longest = max(spec.labels, key=lambda label: len(renderer.completion_ids(label)))
        prompt = renderer.encode(task.messages({"text": text}), longest, spec.recipe.train.max_seq_len)[0]
        with lock:
            model.set_adapter(spec.name)
            label, prob = LabelPredictor(model, renderer, spec.labels, bf16=bf16, scoring=spec.scoring).predict([prompt])[0]  # as serve
        return {"object": "chat.completion", "model": body["model"], "microtune": {"label": label, "probability": prob},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": label}, "finish_reason": "stop"}]}

    stops = sorted(t for t in {renderer.stop_id, tokenizer.eos_token_id} if t is not None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    def generate(spec: Any, task: Any, text: str, max_tokens: int | None) -> dict[str, Any]:
        """Extract (JSON-constrained) or generate (free), greedy, one request alone: eval's micro prompt and stop ids."""
        decoder = task.decoder()
        prompt = renderer.prompt_ids(task.messages({"text": text}))
        constraint = json_schema(decoder.schema, tokenizer, stops) if decoder.kind == "json" else None
        req = GenRequest(prompt, max_tokens or decoder.max_new_tokens, set(stops), constraint=constraint)
        with lock:
            model.set_adapter(spec.name)
            done = BatchGenerator(model, pad, bf16, max_batch=1, tokenizer=tokenizer).run([req])[0]
        return {"object": "chat.completion", "model": spec.name, "microtune": {"task": spec.recipe.task.type, "output": task.parse(done.text)},
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(done.ids), "total_tokens": len(prompt) + len(done.ids)},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason}]}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _base_of(path: Any) -> str:
    from pathlib import Path

    from microtune.config import validate_recipe
    from microtune.core.artifacts import read_json

    return validate_recipe(read_json(Path(path) / "recipe.json")).model.base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--adapter", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--bf16", default="auto")
    args = ap.parse_args()
    bf16 = use_bf16(args.bf16 if args.bf16 == "auto" else args.bf16 == "true")
    uvicorn.run(build(parse_adapter_options(args.adapter), bf16), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

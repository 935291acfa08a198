"""The task-type mix of benchmarks/serve_load.py (``--mix``): classify, extract and generate micro-models on one base.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py --mix [--requests 36] [--repeats 2] [--gen-tokens 24] [--clients 32]

Six micro-models on the bundled SmolLM2-135M-Instruct, each built as serve_load's classify ones are (PEFT
``apply_method`` from the recipe's method section, seeded random B matrices, written as adapter artifacts):
the four classify models (banking-a/b, faa-a/b), `ade-a` (extract, the phee-ade recipe: four JSON fields) and
`tldr-a` (generate, the scitldr recipe). Request i goes to model i mod 6 with text i // 6 of that model's test
split (a scitldr abstract whose micro prompt does not fit the recipe's ``train.max_seq_len`` is skipped: the
server refuses it, by design). Extract and generate requests send ``max_tokens`` = ``--gen-tokens`` (default 24,
under the recipes' ``task.max_new_tokens`` of 80 and 60) so a round stays short.

The naive peer (benchmarks/naive_lora_server.py) answers the same requests one at a time with the same decoding:
classify with the constrained label decoder, extract with microtune's BatchGenerator on a batch of one constrained
to the same JSON schema, generate greedy. Failures: a non-200 answer; classify: a label outside the model's labels;
extract: content that is not a JSON object with exactly the recipe's fields; generate: no text content. Agreement
per task type between the two servers on the last round: the same label, the same parsed JSON object, the same text.

Needs a server that serves extract and generate micro-models (the engine work: ``BatchGenerator`` in
`microtune serve`); on a tree without it `microtune serve` refuses `ade-a` at start and the script stops there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MIX_MODELS = {"banking-a": ("banking-intents", 1), "banking-b": ("banking-intents", 2), "faa-a": ("faa-maintenance", 3),
              "faa-b": ("faa-maintenance", 4), "ade-a": ("phee-ade", 5), "tldr-a": ("scitldr", 6)}
TASK_ORDER = ("classify", "extract", "generate")


def recipe_of(recipe_name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "recipes" / f"{recipe_name}.yaml").read_text())


def task_types(models: dict[str, tuple[str, int]]) -> dict[str, str]:
    return {name: recipe_of(recipe)["task"]["type"] for name, (recipe, _) in models.items()}


def fields_of(models: dict[str, tuple[str, int]]) -> dict[str, set[str]]:
    """The extract models' JSON fields (the answer must have exactly these keys)."""
    return {name: set(recipe_of(recipe)["task"]["fields"]) for name, (recipe, _) in models.items()
            if recipe_of(recipe)["task"]["type"] == "extract"}


def test_texts(recipe_name: str) -> list[str]:
    """The recipe's test texts; for extract/generate only those whose micro prompt fits ``train.max_seq_len``
    (the server refuses a longer one with a 400, which is right, but not what this benchmark measures)."""
    raw = recipe_of(recipe_name)
    rows = [json.loads(line) for line in (ROOT / "recipes" / raw["data"]["test"]).read_text().splitlines() if line.strip()]
    texts = [r["text"] for r in rows]
    if raw["task"]["type"] == "classify":
        return texts
    from microtune.config import load_recipe
    from microtune.models import load_tokenizer, resolve_base
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml")
    renderer, task = Renderer(load_tokenizer(resolve_base(recipe.model))), get_task(recipe.task, [])
    return [t for t in texts if len(renderer.prompt_ids(task.messages({"text": t}))) < recipe.train.max_seq_len]


def mix_requests(total: int, models: dict[str, tuple[str, int]]) -> list[tuple[str, str]]:
    names = list(models)
    texts = {name: test_texts(recipe) for name, (recipe, _) in models.items()}
    return [(names[i % len(names)], texts[names[i % len(names)]][(i // len(names)) % len(texts[names[i % len(names)]])])
            for i in range(total)]


class Checker:
    """What a right answer is per task type, and the key two servers' answers are compared on."""

    def __init__(self, models: dict[str, tuple[str, int]], labels: dict[str, set[str]], gen_tokens: int):
        self.types, self.fields, self.labels, self.gen_tokens = task_types(models), fields_of(models), labels, gen_tokens

    def body(self, model: str, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
        if self.types[model] != "classify":
            body["max_tokens"] = self.gen_tokens
        return body

    def answer(self, model: str, status: int, data: Any) -> tuple[Any, str | None]:
        """``(comparable answer, failure or None)`` of one HTTP answer."""
        content = data.get("choices", [{}])[0].get("message", {}).get("content") if status == 200 and isinstance(data, dict) else None
        if status != 200:
            return None, f"{model}: HTTP {status} {str(data)[:200]}"
        kind = self.types[model]
        if kind == "classify":
            return content, None if content in self.labels[model] else f"{model}: label {content!r} outside the model's labels"
        if kind == "extract":
            try:
                obj = json.loads(content) if isinstance(content, str) else None
            except ValueError:
                obj = None
            if not isinstance(obj, dict) or set(obj) != self.fields[model]:
                return None, f"{model}: not a JSON object with exactly the fields {sorted(self.fields[model])}: {str(content)[:200]}"
            return json.dumps(obj, sort_keys=True), None
        if not isinstance(content, str):
            return None, f"{model}: no text content: {str(data)[:200]}"
        return content.strip(), None


def summary(jobs: list[tuple[str, str]], results: dict[str, list[dict[str, Any]]], types: dict[str, str]) -> dict[str, Any]:
    """Per task type: requests per round, failures over all rounds, agreement between the two servers on the last round."""
    a, b = (results[n][-1]["answers"] for n in results)
    out = {}
    for kind in TASK_ORDER:
        idx = [i for i, (model, _) in enumerate(jobs) if types[model] == kind]
        if not idx:
            continue
        fails = {name: sum(1 for run in runs for f in run["failures"] if types[f.split(":", 1)[0]] == kind) for name, runs in results.items()}
        agree = sum(a[i] == b[i] and a[i] is not None for i in idx) / len(idx)
        out[kind] = {"requests": len(idx), "failures": fails, "agree": agree}
    return out


def markdown(args: Any, results: dict[str, list[dict[str, Any]]], jobs: list[tuple[str, str]], types: dict[str, str],
             pct: Any) -> str:
    import statistics

    naive = statistics.median(r["throughput"] for r in results["naive (swap + one at a time)"])
    table = [f"| server | requests/s (median of {args.repeats}) | × naive | p50 latency | p95 | failed requests |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        lat = [x for run in runs for x in run["latency"] if x > 0]
        tput = statistics.median(r["throughput"] for r in runs)
        fails = sum(len(r["failures"]) for r in runs)
        table.append(f"| {name} | {tput:.2f} | {tput / naive:.1f}× | {pct(lat, 50):.2f}s | {pct(lat, 95):.2f}s | "
                     f"{fails} of {len(jobs) * len(runs)} |")
    per = summary(jobs, results, types)
    names = list(results)
    table += ["", "| task type | requests per round | failed: microtune serve | failed: naive | same answer (last round) |",
              "|---|---:|---:|---:|---:|"]
    table += [f"| {kind} | {s['requests']} | {s['failures'][names[0]]} | {s['failures'][names[1]]} | {s['agree']:.0%} |"
              for kind, s in per.items()]
    command = (f"`PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py --mix --clients {args.clients} --requests {args.requests} "
               f"--repeats {args.repeats} --gen-tokens {args.gen_tokens} --threads {args.threads}`")
    import os

    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    return ("## Serving: a mix of classify, extract and generate micro-models on one base (CPU)\n\n"
            f"{command} — {args.clients} concurrent clients, {args.requests} chat requests per round, round-robin over 6 "
            "micro-models on the bundled SmolLM2-135M-Instruct (LoRA r=16 all-linear, built with PEFT from each recipe's method "
            "section with seeded random B matrices, not trained): banking-a/b and faa-a/b (classify, as in the classify table), "
            f"ade-a (extract, phee-ade: a JSON object of 4 fields) and tldr-a (generate, scitldr); extract/generate requests ask "
            f"for at most {args.gen_tokens} new tokens. Each model's own test texts; rounds alternating the two servers. The "
            "naive peer answers one request at a time with the same decoding (classify: the constrained label decoder; "
            "extract: microtune's BatchGenerator on a batch of one, constrained to the same JSON schema; generate: greedy). "
            "Failed: non-200, a label outside the model's labels, an extract answer that is not a JSON object with exactly the "
            f"fields, a generate answer without text. {args.threads} torch thread(s) per server; 1-minute load average at "
            f"the end {load} on {os.cpu_count()} CPUs. Latency over all rounds.\n\n" + "\n".join(table))

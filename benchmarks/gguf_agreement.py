"""The exported GGUF run by llama.cpp: does it answer the test split as `microtune eval` did, and how fast?

Two interpreters: this script runs in the project's venv (it exports with microtune); llama-cpp-python lives in a venv
of its own (it compiles llama.cpp from its sdist) and runs benchmarks/gguf_llama_worker.py.

    python3 -m venv .venv-llama                                        # once: llama.cpp's own venv (gitignored)
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 .venv-llama/bin/pip install llama-cpp-python
    PYTHONPATH=src .venv/bin/python benchmarks/gguf_agreement.py ADAPTER [--eval-dir DIR] [--gguf-type f16 q8_0]
        [--llama-python .venv-llama/bin/python] [--threads 1] [--limit N] [--out DIR] [--no-write]

ADAPTER is an adapter folder written by `microtune train`; its eval (the folder `<recipe>/evals/<run>/` beside
`<recipe>/adapters/<run>/`, or --eval-dir; both are only read) holds the rows and eval's micro-model answers
(predictions.jsonl). For each --gguf-type the script exports the GGUF with `microtune export --gguf` (into --out or a
temp folder), and the worker loads it with `llama_cpp.Llama` on the CPU and answers every row in two ways:

- chat (what a llama.cpp user gets): `create_chat_completion` with the recipe's system instruction and the
  text, so the chat template stored in the GGUF renders the prompt and llama.cpp's tokenizer encodes it; greedy, under
  a GBNF grammar of the label list (classify), of the JSON schema (extract), or free (generate). The grammar works on
  characters, so llama.cpp may spell a label with other tokens than eval's trie does.
- trie (classify only): microtune's prompt token ids, and microtune's greedy walk of the label token trie on llama.cpp's
  logits (the rule of `task.scoring: trie`, eval's default; an adapter trained with `loglik` was ranked by eval, so a
  few rows may differ for that reason alone). It isolates the weights (export, quantisation,
  llama.cpp's kernels) from prompt rendering and tokenisation.

Printed per GGUF type: the share of answers equal to eval's micro prediction (each way), the accuracy against gold of
both sides, the valid-label rate of the chat answers, the rows whose prompt llama.cpp tokenised to exactly microtune's
ids, and answer tokens/s and rows/s (one row at a time, prompts included). Then it writes its section of BENCHMARKS.md
between the gguf-agreement markers (--no-write: print only). Without llama-cpp-python in --llama-python it says how to
build it and exits 2, before exporting anything.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("gguf_llama_worker.py")
START, END = "<!-- gguf-agreement:start -->", "<!-- gguf-agreement:end -->"
DEFAULT_LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"
BUILD_HINT = ("  build it in a venv of its own (it compiles llama.cpp; ~20 min on 2 cores):\n"
              "    python3 -m venv .venv-llama\n"
              "    CMAKE_ARGS=\"-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF\" CMAKE_BUILD_PARALLEL_LEVEL=2 .venv-llama/bin/pip install llama-cpp-python\n"
              "  then rerun this command (or pass --llama-python PATH to an interpreter that has it).")


def llama_version(python: Path) -> str:
    """llama-cpp-python's version in ``python``; exits 2 with the build commands when it is missing."""
    if not python.is_file():
        raise SystemExit(f"gguf_agreement: no interpreter at {python} (--llama-python).\n{BUILD_HINT}\n  Nothing was exported.")
    done = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no error text)"])[-1]
        print(f"gguf_agreement: {python} cannot import llama_cpp (llama-cpp-python):\n  {last}\n"
              f"{BUILD_HINT}\n  Nothing was exported.", file=sys.stderr)
        raise SystemExit(2)
    return done.stdout.strip()


def eval_rows(adapter: Path, eval_dir: Path | None, limit: int) -> tuple[Path, list[dict[str, Any]]]:
    folder = eval_dir or adapter.parent.parent / "evals" / adapter.name
    predictions = folder / "predictions.jsonl"
    if not predictions.is_file():
        raise SystemExit(f"gguf_agreement: no {predictions}: run `microtune eval RECIPE` for this adapter first, "
                         "or pass --eval-dir EVAL_FOLDER")
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    return folder, rows[:limit] if limit else rows


def job_for(adapter: Path, rows: list[dict[str, Any]], threads: int) -> tuple[Any, dict[str, Any]]:
    """The task and the worker's job without its GGUF path: messages and microtune's prompt ids per row (as eval's micro
    system built them), the decoder, and the label token sequences of microtune's trie (answer + end-of-turn ids)."""
    from microtune.config import artifact_recipe
    from microtune.core.artifacts import read_manifest
    from microtune.models.resolve import load_tokenizer, resolve_base
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    recipe = artifact_recipe(adapter / "recipe.json")
    task = get_task(recipe.task, read_manifest(adapter, "adapter").get("labels") or [])
    renderer = Renderer(load_tokenizer(resolve_base(recipe.model)))  # eval's tokenizer: the base's
    spec = task.decoder()
    examples = [{"text": r["text"], "label": r["gold"]} if task.has_labels else {"text": r["text"]} for r in rows]
    messages = [task.messages(e) for e in examples]
    if task.has_labels:  # eval's micro prompt: cut to train.max_seq_len with room for the gold label, as eval cut it
        ids = [renderer.encode(m, task.target(e), recipe.train.max_seq_len)[0] for m, e in zip(messages, examples)]
    else:
        ids = [renderer.prompt_ids(m) for m in messages]
    tries = {c: renderer.completion_ids(c) for c in spec.candidates} if spec.kind == "labels" else {}
    max_tokens = spec.max_new_tokens or max(len(t) for t in tries.values()) + 2
    longest = max(len(renderer.prompt_ids(m)) for m in messages)
    job = {"kind": spec.kind, "candidates": spec.candidates, "schema": spec.schema, "max_tokens": max_tokens,
           "tries": tries, "modes": ["chat", "trie"] if spec.kind == "labels" else ["chat"], "threads": threads,
           "n_ctx": max(256, longest + max_tokens + 64), "rows": [{"messages": m, "ids": i} for m, i in zip(messages, ids)]}
    return (recipe, task, spec.scoring), job


def run_worker(python: Path, job: dict[str, Any], folder: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run the llama.cpp worker on ``job``; its header and its lines per mode, in row order."""
    job_file, results = folder / f"{Path(job['gguf']).stem}.job.json", folder / f"{Path(job['gguf']).stem}.results.jsonl"
    job_file.write_text(json.dumps(job, ensure_ascii=False))
    done = subprocess.run([str(python), str(WORKER), str(job_file), str(results)])
    if done.returncode:
        raise SystemExit(f"gguf_agreement: the llama.cpp worker failed (exit {done.returncode}) on {job['gguf']}; its error is above")
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for line in lines[1:]:
        by_mode.setdefault(line["mode"], []).append(line)
    return lines[0], by_mode


def summarise(task: Any, rows: list[dict[str, Any]], job: dict[str, Any], by_mode: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Agreement with eval, accuracy, valid rate, tokenizer agreement and speed of each mode."""
    n, out = len(rows), {}
    for mode, lines in by_mode.items():
        answers = [task.parse(line["text"].strip()) for line in lines]
        seconds = sum(line["seconds"] for line in lines)
        out[mode] = {
            "same": sum(a == r["micro"]["pred"] for a, r in zip(answers, rows)),
            "correct": sum(a == r["gold"] for a, r in zip(answers, rows)) if task.has_labels else None,
            "valid": sum(a is not None for a in answers),
            "rows_per_s": n / seconds,
            "answer_tokens_per_s": sum(line.get("answer_tokens", 0) for line in lines) / seconds,
            "differ": [(i, r["micro"]["pred"], a) for i, (a, r) in enumerate(zip(answers, rows)) if a != r["micro"]["pred"]],
        }
        if mode == "chat":
            out[mode]["same_ids"] = sum(line["prompt_ids"] == row["ids"] for line, row in zip(lines, job["rows"]))
    out["eval_correct"] = sum(r["micro"]["pred"] == r["gold"] for r in rows) if task.has_labels else None
    return out


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.1%})"


def table(results: dict[str, dict[str, Any]], n: int, sizes: dict[str, float]) -> list[str]:
    lines = ["| GGUF | size | decoding in llama.cpp | same answer as eval | accuracy | valid answers | prompt ids = microtune's "
             "| answer tokens/s | rows/s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for gguf_type, summary in results.items():
        for mode, name in (("chat", "chat template + GBNF grammar"), ("trie", "microtune's ids + label trie")):
            if mode not in summary:
                continue
            s = summary[mode]
            accuracy = f"{s['correct'] / n:.3f}" if s["correct"] is not None else "—"
            same_ids = pct(s["same_ids"], n) if "same_ids" in s else "(microtune's)"
            speed = f"{s['answer_tokens_per_s']:.1f}" if mode == "chat" else "—"
            lines.append(f"| {gguf_type} | {sizes[gguf_type]:.0f} MB | {name} | {pct(s['same'], n)} | {accuracy} | "
                         f"{pct(s['valid'], n)} | {same_ids} | {speed} | {s['rows_per_s']:.2f} |")
    return lines


def shown(path: Path) -> str:
    """A path as the command line in BENCHMARKS.md shows it: relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def eval_speed(eval_dir: Path) -> str:
    """Eval's own micro-model speed, for comparison (its metrics.json; empty when absent)."""
    metrics = eval_dir / "metrics.json"
    micro = json.loads(metrics.read_text()).get("micro", {}) if metrics.is_file() else {}
    if "examples_per_s" not in micro:
        return ""
    return (f"; eval itself (torch, batched) answered {micro['examples_per_s']:.1f} rows/s, one row at a time "
            f"{micro.get('latency_ms_p50', float('nan')):.0f} ms (p50)")


def write_section(section: list[str]) -> None:
    path = ROOT / "BENCHMARKS.md"
    text, body = path.read_text(), "\n".join([START, *section, END])
    text = text[: text.index(START)] + body + text[text.index(END) + len(END):] if START in text else text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="adapter folder written by `microtune train` (only read)")
    parser.add_argument("--gguf-type", nargs="+", default=["f16", "q8_0"], help="GGUF types to export and run [default: f16 q8_0]")
    parser.add_argument("--eval-dir", type=Path, default=None, help="eval folder with predictions.jsonl [default: the adapter's run]")
    parser.add_argument("--llama-python", type=Path, default=DEFAULT_LLAMA_PYTHON,
                        help=f"interpreter with llama-cpp-python [default: {DEFAULT_LLAMA_PYTHON.relative_to(ROOT)}]")
    parser.add_argument("--out", type=Path, default=None, help="folder for the GGUFs, jobs and raw results [default: a temp folder]")
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N rows (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (prompt and answer) [default: 1: on a machine "
                        "whose cores are busy, llama.cpp's OpenMP threads wait on each other; here 2 threads ran ~40x slower than 1]")
    parser.add_argument("--no-write", action="store_true", help="print the results; leave BENCHMARKS.md as it is")
    args = parser.parse_args()

    version = llama_version(args.llama_python)  # before the export: a missing package costs nothing
    adapter = args.adapter.resolve()
    eval_dir, rows = eval_rows(adapter, args.eval_dir, args.limit)
    out = args.out or Path(tempfile.mkdtemp(prefix="gguf-agreement-"))
    out.mkdir(parents=True, exist_ok=True)

    from microtune import pipeline

    started = time.perf_counter()
    (recipe, task, scoring), job = job_for(adapter, rows, args.threads)
    results, sizes, headers = {}, {}, {}
    for gguf_type in args.gguf_type:
        print(f"exporting {gguf_type} …", flush=True)
        gguf = pipeline.export(adapter, gguf=out / f"{recipe.name}-{gguf_type}.gguf", gguf_type=gguf_type, force=True)["gguf"]
        sizes[gguf_type] = gguf.stat().st_size / 1e6
        headers[gguf_type], by_mode = run_worker(args.llama_python, {**job, "gguf": str(gguf)}, out)
        results[gguf_type] = summarise(task, rows, job, by_mode)
        for mode in by_mode:
            s = results[gguf_type][mode]
            print(f"{gguf_type} {mode}: same answer as eval {pct(s['same'], len(rows))}; valid {pct(s['valid'], len(rows))}; "
                  f"differing rows (row, eval, llama.cpp): {s['differ'][:8]}", flush=True)

    n = len(rows)
    header = next(iter(headers.values()))
    eval_acc = f"{results[args.gguf_type[0]]['eval_correct'] / n:.3f}" if task.has_labels else "—"
    command = (f"PYTHONPATH=src .venv/bin/python benchmarks/gguf_agreement.py {args.adapter} --eval-dir {eval_dir} "
               f"--gguf-type {' '.join(args.gguf_type)} --llama-python {shown(args.llama_python)} --threads {args.threads}"
               f"{f' --limit {args.limit}' if args.limit else ''}")
    section = [f"## The GGUF in llama.cpp: agreement with eval ({recipe.name}, CPU)", "",
               f"Command: `{command}` ({time.perf_counter() - started:.0f} s in all, exports included, {time.strftime('%Y-%m-%d')}, "
               f"llama-cpp-python {version} built from its sdist on this machine, {args.threads} llama.cpp thread"
               f"{'s' if args.threads > 1 else ''}). {n} test rows; eval's micro accuracy {eval_acc} (`task.scoring: {scoring}`)"
               f"{eval_speed(eval_dir)}.", "",
               *table(results, n, sizes), "",
               "Chat: the GGUF's own chat template and tokenizer, with the recipe's system instruction, greedy under a GBNF grammar "
               "of the labels: what llama.cpp does with the file (Ollama's Modelfile carries the same system instruction and the "
               "template in Go syntax; Ollama itself was not run). Trie: microtune's prompt ids and label trie, walked greedily on "
               "llama.cpp's logits. Answer tokens exclude the end-of-turn token, so a one-token label counts 1. Rows/s count whole "
               "calls, one row at a time, the shared system prompt's KV cache reused. "
               f"GGUF metadata as llama.cpp read it: chat template {'present' if header['chat_template_in_gguf'] else 'absent'}, "
               f"eos id {header['eos_token_id']}, add_bos {header['add_bos_token']}."]
    print("\n".join(section))
    if not args.no_write:
        write_section(section)
        print(f"wrote the gguf-agreement section of {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()

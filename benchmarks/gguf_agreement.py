"""The exported GGUF run by llama.cpp: does it answer the test split as `microtune eval` did, and how fast?

    pip install llama-cpp-python          # builds llama.cpp from source: takes a while
    PYTHONPATH=src .venv/bin/python benchmarks/gguf_agreement.py ADAPTER [--gguf-type f16|q8_0|bf16|f32] [--eval-dir DIR]

ADAPTER is an adapter folder written by `microtune train`; its eval (`microtune eval RECIPE`, the folder
`<recipe>/evals/<run>/` beside `<recipe>/adapters/<run>/`, or --eval-dir) holds the rows and eval's micro-model
answers (predictions.jsonl). The script exports the GGUF with `microtune export --gguf` (into a temp folder, or --out),
loads it with `llama_cpp.Llama` on the CPU, and answers every row greedily:

- classify: a llama.cpp grammar that allows only the valid answers (the labels, or the label sets), like eval's
  label trie. The grammar works on characters, so llama.cpp may spell a label with other tokens than eval's trie;
  such a row can differ without any weight being wrong.
- extract: a grammar built from the task's JSON schema (`llama_cpp.llama_grammar.json_schema_to_gbnf`);
- generate: free text up to the task's max_new_tokens.

The prompt is fed as the token ids `microtune` renders (the adapter's tokenizer and chat template), so both
sides see the same input; the script also counts the rows where llama.cpp's own tokenizer (the GGUF's
metadata) gives the same ids. It prints the share of answers equal to eval's micro prediction, the accuracy
of both against gold (classify), and llama.cpp's answer tokens/s and rows/s (one row at a time), then writes its section of
BENCHMARKS.md between the gguf-agreement markers. Without llama-cpp-python it says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- gguf-agreement:start -->", "<!-- gguf-agreement:end -->"


def need_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        print("gguf_agreement: the package llama-cpp-python is not installed, so there is no llama.cpp to run the GGUF.\n"
              "  install it (it compiles llama.cpp, several minutes): pip install llama-cpp-python\n"
              "  then rerun this command. Nothing was exported.", file=sys.stderr)
        raise SystemExit(2) from None
    return llama_cpp


def eval_rows(adapter: Path, eval_dir: Path | None, limit: int) -> tuple[Path, list[dict[str, Any]]]:
    folder = eval_dir or adapter.parent.parent / "evals" / adapter.name
    predictions = folder / "predictions.jsonl"
    if not predictions.is_file():
        raise SystemExit(f"gguf_agreement: no {predictions}: run `microtune eval RECIPE` for this adapter first, "
                         "or pass --eval-dir EVAL_FOLDER")
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    return folder, rows[:limit] if limit else rows


def gbnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # GBNF string literals take JSON's escapes


def grammar_for(task: Any, llama_cpp: Any) -> Any:
    spec = task.decoder()
    if spec.kind == "labels":
        return llama_cpp.LlamaGrammar.from_string("root ::= " + " | ".join(gbnf_literal(c) for c in spec.candidates), verbose=False)
    if spec.kind == "json" and spec.schema:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        return llama_cpp.LlamaGrammar.from_string(json_schema_to_gbnf(json.dumps(spec.schema)), verbose=False)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="adapter folder written by `microtune train`")
    parser.add_argument("--gguf-type", default="f16", help="f16 (default), bf16, q8_0 or f32")
    parser.add_argument("--eval-dir", type=Path, default=None, help="eval folder with predictions.jsonl [default: the adapter's run]")
    parser.add_argument("--out", type=Path, default=None, help="where the GGUF goes [default: a temp folder]")
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N rows (0: all)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads [default: llama.cpp's choice]")
    args = parser.parse_args()

    llama_cpp = need_llama_cpp()  # before the export: a missing package costs nothing
    adapter = args.adapter.resolve()
    eval_dir, rows = eval_rows(adapter, args.eval_dir, args.limit)

    from transformers import AutoTokenizer

    from microtune import pipeline
    from microtune.config import artifact_recipe
    from microtune.core.artifacts import read_manifest
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    started = time.perf_counter()
    out = (args.out or Path(tempfile.mkdtemp(prefix="gguf-agreement-"))) / f"{adapter.name}.gguf"
    gguf = pipeline.export(adapter, gguf=out, gguf_type=args.gguf_type, force=True)["gguf"]
    recipe = artifact_recipe(adapter / "recipe.json")
    task = get_task(recipe.task, read_manifest(adapter, "adapter").get("labels") or [])
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    renderer = Renderer(tokenizer)
    spec = task.decoder()
    max_tokens = spec.max_new_tokens or max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in spec.candidates or [""]) + 2
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=recipe.train.max_seq_len + max_tokens + 64, n_threads=args.threads,
                          verbose=False, seed=0)
    grammar = grammar_for(task, llama_cpp)
    stop = [tokenizer.convert_ids_to_tokens(renderer.stop_id)]

    same, same_ids, correct, eval_correct, answer_tokens, seconds = 0, 0, 0, 0, 0, 0.0
    for i, row in enumerate(rows, 1):
        text = renderer.prompt_text(task.messages({"text": row["text"]}))
        ids = renderer.prompt_ids(task.messages({"text": row["text"]}))
        same_ids += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        t0 = time.perf_counter()
        result = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, grammar=grammar, stop=stop)
        seconds += time.perf_counter() - t0  # the whole call: the prompt's evaluation and the answer's tokens
        answer_tokens += result["usage"]["completion_tokens"]
        answer = task.parse(result["choices"][0]["text"].strip())
        same += answer == row["micro"]["pred"]
        correct += answer == row["gold"]
        eval_correct += row["micro"]["pred"] == row["gold"]
        if i % 25 == 0 or i == len(rows):
            print(f"{i}/{len(rows)} rows: {same}/{i} same as eval", flush=True)

    n = len(rows)
    size = gguf.stat().st_size / 1e6
    agreement = f"{same}/{n} ({same / n:.1%})"
    speed, rows_per_s = f"{answer_tokens / seconds:.1f}", f"{n / seconds:.2f}"
    accuracy = f"{correct / n:.3f} (eval: {eval_correct / n:.3f})" if task.has_labels else "—"
    print(f"GGUF {args.gguf_type}: {size:.0f} MB; same answer as eval {agreement}; accuracy {accuracy}; "
          f"llama.cpp tokenizer gives microtune's ids on {same_ids}/{n}; {speed} answer tokens/s ({rows_per_s} rows/s, prompts included)")
    section = "\n".join([
        START, f"## The GGUF in llama.cpp: agreement with eval ({recipe.name}, {args.gguf_type}, CPU)", "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/gguf_agreement.py {args.adapter} --gguf-type {args.gguf_type}"
        f"{f' --limit {args.limit}' if args.limit else ''}` ({time.perf_counter() - started:.0f} s, {time.strftime('%Y-%m-%d')}, "
        f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}). Eval folder: `{eval_dir}`.", "",
        "| GGUF | size | same answer as eval | accuracy (eval's) | llama.cpp tokenizer = microtune's ids | answer tokens/s | rows/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {args.gguf_type} | {size:.0f} MB | {agreement} | {accuracy} | {same_ids}/{n} | {speed} | {rows_per_s} |", "",
        "Tokens/s and rows/s are over whole calls, one row at a time (each call evaluates its prompt, then answers).", END])
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    text = text[: text.index(START)] + section + text[text.index(END) + len(END):] if START in text else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()

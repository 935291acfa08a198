"""The llama.cpp half of `benchmarks/gguf_agreement.py`: run by the interpreter that has llama-cpp-python (its own venv).

    LLAMA_PYTHON benchmarks/gguf_llama_worker.py JOB.json RESULTS.jsonl

It imports only the standard library and llama_cpp (never microtune, torch or transformers), so llama-cpp-python can
live in a venv of its own. JOB.json (written by gguf_agreement.py) names the GGUF, the threads, the decoder and the
rows; the worker answers every row in each mode the job asks for and writes one JSON line per row and mode:

- ``chat``: what a llama.cpp user gets. ``create_chat_completion`` with the row's messages (the recipe's system
  instruction + the text), so the prompt is rendered by the chat template stored in the GGUF and tokenised by
  llama.cpp's own tokenizer (the GGUF's vocabulary); greedy, constrained by a GBNF grammar: the label list (classify),
  the task's JSON schema (extract), or none (generate). The line carries the prompt ids llama.cpp used, so the caller
  can compare them with microtune's.
- ``trie``: microtune's own decoding on llama.cpp's logits. microtune's prompt ids are evaluated as they are, then the
  label token trie is walked greedily (per step the allowed token with the highest logit, a decided label stops the
  walk), exactly as ``models.decoding.LabelPredictor`` does with ``scoring: trie``. It isolates the weights (export,
  quantisation, llama.cpp's kernels) from prompt rendering and tokenisation.

The first line is a header: the llama-cpp-python version and what the GGUF's metadata says (chat template present,
special token ids). Progress goes to stderr.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

END = -1  # trie key marking a finished label (as in microtune.models.decoding)


def build_trie(sequences: dict[str, list[int]]) -> dict[int, Any]:
    root: dict[int, Any] = {}
    for label, seq in sequences.items():
        node = root
        for tok in seq:
            node = node.setdefault(tok, {})
        node[END] = label
    return root


def settle(node: dict[int, Any]) -> dict[int, Any]:
    """The terminal node when only one label can follow ``node``: a forced token costs no forward pass (microtune's rule)."""
    n = node
    while END not in n and len(n) == 1:
        n = next(iter(n.values()))
    return n if END in n and len(n) == 1 else node


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def last_logits(llm: Any) -> Any:
    """The logits after the last evaluated token, read from llama.cpp's context: llama-cpp-python 0.3 keeps no scores
    unless every position's logits are computed (``logits_all``), which would also run the output head on the prompt."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()


def eval_tokens(llm: Any, ids: list[int], logits: Callable[[Any], Any] = last_logits) -> Any:
    """Evaluate ``ids`` after the cached tokens they share with the last call (the system prompt, mostly); the logits of
    the last one. At least one token is always evaluated, so its logits are fresh."""
    keep = min(shared_prefix(list(llm.input_ids[: llm.n_tokens]), ids), len(ids) - 1)
    llm.n_tokens = keep  # Llama.eval drops the KV cache past n_tokens before it evaluates
    llm.eval(ids[keep:])
    return logits(llm)


def walk_trie(llm: Any, prompt: list[int], trie: dict[int, Any], logits: Callable[[Any], Any] = last_logits) -> tuple[str, int]:
    """microtune's greedy trie walk on llama.cpp's logits: the label and the number of llama.cpp evaluations."""
    scores, node, calls = eval_tokens(llm, prompt, logits), settle(trie), 1
    while END not in node:
        allowed = [t for t in node if t != END]
        tok = max(allowed, key=lambda t: scores[t])  # first of equals, like torch's argmax over the allowed list
        node = settle(node[tok])
        if END in node:
            break
        llm.eval([tok])
        scores, calls = logits(llm), calls + 1
    return node[END], calls


def grammar_of(job: dict[str, Any], llama_cpp: Any) -> Any:
    """The GBNF grammar of a valid answer: the labels (JSON string escapes are GBNF's), the JSON schema, or none."""
    if job["kind"] == "labels":
        rule = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in job["candidates"])
        return llama_cpp.LlamaGrammar.from_string(rule, verbose=False)
    if job["kind"] == "json" and job.get("schema"):
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        return llama_cpp.LlamaGrammar.from_string(json_schema_to_gbnf(json.dumps(job["schema"])), verbose=False)
    return None


def header(llm: Any, llama_cpp: Any) -> dict[str, Any]:
    meta = llm.metadata
    return {"header": True, "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
            "chat_template_in_gguf": "tokenizer.chat_template" in meta, "chat_format": llm.chat_format,
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"), "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "add_bos_token": meta.get("tokenizer.ggml.add_bos_token"), "n_vocab": llm.n_vocab(),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}


def run_chat(llm: Any, job: dict[str, Any], row: dict[str, Any], grammar: Any) -> dict[str, Any]:
    started = time.perf_counter()
    result = llm.create_chat_completion(messages=row["messages"], grammar=grammar, temperature=0.0, max_tokens=job["max_tokens"])
    seconds = time.perf_counter() - started
    usage = result["usage"]
    return {"mode": "chat", "text": result["choices"][0]["message"]["content"] or "", "seconds": seconds,
            "prompt_ids": [int(t) for t in llm.input_ids[: usage["prompt_tokens"]]],
            "answer_tokens": usage["completion_tokens"], "finish": result["choices"][0]["finish_reason"]}


def run_trie(llm: Any, row: dict[str, Any], trie: dict[int, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    label, calls = walk_trie(llm, row["ids"], trie)
    return {"mode": "trie", "text": label, "seconds": time.perf_counter() - started, "evals": calls}


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} JOB.json RESULTS.jsonl (written by benchmarks/gguf_agreement.py)")
    import llama_cpp

    job = json.loads(Path(sys.argv[1]).read_text())
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"], n_threads_batch=job["threads"],
                          n_batch=job["n_ctx"], verbose=False, seed=0)
    grammar = grammar_of(job, llama_cpp)
    trie = build_trie({label: ids for label, ids in job["tries"].items()}) if job.get("tries") else None
    rows = job["rows"]
    with Path(sys.argv[2]).open("w") as out:
        out.write(json.dumps(header(llm, llama_cpp)) + "\n")
        for mode in job["modes"]:
            for i, row in enumerate(rows):
                line = run_chat(llm, job, row, grammar) if mode == "chat" else run_trie(llm, row, trie)
                out.write(json.dumps({"row": i, **line}, ensure_ascii=False) + "\n")
                if (i + 1) % 50 == 0 or i + 1 == len(rows):
                    print(f"  llama.cpp {mode}: {i + 1}/{len(rows)} rows", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

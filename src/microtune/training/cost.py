"""Cost accounting: what a run used, what it would cost on common GPUs, and what full fine-tuning would.

FLOPs per trained token (dense transformer, N = parameters outside the embedding table):
  - PEFT (frozen base): forward 2N + backward through activations 2N ≈ 4N (adapter weight grads are negligible);
  - full fine-tuning: forward 2N + backward 4N = 6N.
GPU estimates assume the stated dense bf16 peak, a model-FLOPs utilisation (MFU) of 30 % and the
stated on-demand hourly price; they are estimates, written next to their assumptions.
"""
from __future__ import annotations

from typing import Any

import microtune.methods as methods
from microtune.models.prices import GPUS

MFU = 0.30
BYTES_FULL = 16  # bf16 weights + fp32 master + 2 Adam moments + bf16 grads, per parameter
BYTES_FROZEN = {"4bit": 0.55, "default": 2.0}  # 4-bit NF4 (+ constants) or bf16, per frozen parameter


def dense_params(model: Any) -> int:
    """Parameters that take part in matmuls for every token (embedding tables excluded)."""
    emb = model.get_input_embeddings()
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def gpu_estimates(flops: float) -> dict[str, dict[str, float]]:
    out = {}
    for name, (tflops, price, _) in GPUS.items():
        hours = flops / (tflops * 1e12 * MFU) / 3600
        out[name] = {"hours": hours, "usd": hours * price}
    return out


def cost_report(kind: str, dense: int, total: int, trainable: int, tokens: int, wall_s: float,
                peak_mb: float, full_measured: dict[str, Any] | None = None) -> dict[str, Any]:
    method = methods.spec(kind).capabilities
    per_token = (6 if method.full_model else 4) * dense
    flops = per_token * tokens
    report: dict[str, Any] = {
        "method": kind, "trainable_params": trainable, "total_params": total, "dense_params": dense,
        "tokens_seen": tokens, "wall_time_s": round(wall_s, 2), "peak_memory_mb": round(peak_mb, 1),
        "train_flops": flops, "achieved_flops_per_s": flops / max(wall_s, 1e-9),
        "gpu_estimates": gpu_estimates(flops),
        "assumptions": {"mfu": MFU, "gpus": {k: {"tflops_bf16_dense": v[0], "usd_per_hour": v[1]} for k, v in GPUS.items()},
                        "flops_per_token": "6N full, 4N PEFT (N = non-embedding parameters)"},
    }
    full_flops = 6 * dense * tokens
    report["full_finetune"] = full_measured or {
        "source": "estimated", "train_flops": full_flops, "trainable_params": total,
        "wall_time_s_estimate": round(wall_s * 1.5, 2),
        "optimizer_memory_mb_estimate": round(total * BYTES_FULL / 2**20, 1),
        "gpu_estimates": gpu_estimates(full_flops),
    }
    frozen = BYTES_FROZEN["4bit" if method.quantized_base else "default"]
    peft_state_mb = ((total - trainable) * frozen + trainable * BYTES_FULL) / 2**20
    report["saving"] = {
        "trainable_share": trainable / max(total, 1),
        "flops_ratio_vs_full": flops / full_flops if not method.full_model else 1.0,
        "state_memory_mb": round(peft_state_mb, 1),
        "state_memory_mb_full": round(total * BYTES_FULL / 2**20, 1),
    }
    return report

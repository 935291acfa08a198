"""The stated price table behind every cost figure: GPUs (training estimates, prediction cost) and CPU cores.

    hourly_price("cuda", "NVIDIA A100-SXM4-80GB")   # -> ("A100-80GB", 1.80)
    hourly_price("cpu", threads=2)                 # -> ("2 CPU cores", 0.0893)

Prices are assumed on-demand list prices (USD per hour), written next to every figure that uses
them; a recipe can state its own (`eval.usd_per_hour`).
"""
from __future__ import annotations

# name: (dense bf16/fp16 tensor peak in TFLOP/s, assumed on-demand $/hour, memory GiB)
GPUS: dict[str, tuple[float, float, int]] = {
    "T4": (65.0, 0.35, 16),
    "L4": (121.0, 0.80, 24),
    "A10G": (70.0, 1.01, 24),
    "A100-80GB": (312.0, 1.80, 80),
    "H100-SXM": (989.0, 3.00, 80),
    "H200": (989.0, 3.80, 141),
}
# One vCPU-hour: AWS c7i.large on-demand (2 vCPUs, $0.0893/h, us-east-1), halved.
CPU_USD_PER_CORE_HOUR = 0.0893 / 2


def _gpu_key(device_name: str) -> str | None:
    """Match a CUDA device name (``NVIDIA A100-SXM4-80GB``) to a table entry."""
    name = device_name.upper().replace(" ", "")
    for key in sorted(GPUS, key=len, reverse=True):
        if key.split("-")[0].upper() in name:
            return key
    return None


def hourly_price(kind: str, device_name: str = "", threads: int = 1) -> tuple[str, float | None]:
    """``(what was priced, USD per hour)``; ``None`` when a GPU is not in the table."""
    if kind == "cuda":
        key = _gpu_key(device_name)
        return (key or device_name or "unknown GPU"), (GPUS[key][1] if key else None)
    return f"{threads} CPU core{'s' if threads != 1 else ''}", round(CPU_USD_PER_CORE_HOUR * threads, 6)

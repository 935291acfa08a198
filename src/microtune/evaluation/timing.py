"""Latency, throughput and cost per 1,000 predictions, measured the same way for every system.

    lat = measure_latency(lambda p: predictor.predict([p]), prompts[:20])   # {"p50_ms", "p95_ms", "n"}
    cost = local_cost(examples_per_s=15.2, usd_per_hour=None)              # from models.prices, stated

Throughput is the batched run over the whole test split (examples / wall seconds). Latency is not that
time divided by the batch size: it is measured on a separate small sample, each row predicted alone
(a batch of one, as a single request would be), after one untimed warm-up call.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from microtune.models.prices import hourly_price

LATENCY_METHOD = ("each of the first {n} test rows predicted alone (batch of 1) after one untimed warm-up; "
                  "p50/p95 of those per-row wall times")
ENDPOINT_LATENCY_METHOD = "one request per test row, sequential; p50/p95 of the per-request wall times"


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    if not seconds:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "n": 0}
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "n": len(ms)}


def measure_latency(predict_one: Callable[[Any], Any], items: Sequence[Any]) -> dict[str, float | int]:
    """Per-item wall time of ``predict_one`` over ``items`` (first call repeated untimed, to warm up)."""
    if not items:
        return percentiles_ms([])
    predict_one(items[0])
    times = []
    for item in items:
        start = time.perf_counter()
        predict_one(item)
        times.append(time.perf_counter() - start)
    return percentiles_ms(times)


def hardware() -> tuple[str, str, int]:
    """``(kind, device name, threads)`` of the machine running the eval."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0), torch.get_num_threads()
    return "cpu", "cpu", torch.get_num_threads()


def local_cost(examples_per_s: float, usd_per_hour: float | None) -> dict[str, Any]:
    """USD per 1,000 predictions at the measured batched throughput and a stated hourly price."""
    kind, name, threads = hardware()
    what, table_price = hourly_price(kind, name, threads)
    price, source = (usd_per_hour, "eval.usd_per_hour in the recipe") if usd_per_hour else (table_price, "microtune.models.prices")
    if price is None:
        return {"usd_per_1k": None, "basis": f"no price for {what} in microtune.models.prices; set eval.usd_per_hour"}
    usd = 1000 / max(examples_per_s, 1e-9) / 3600 * price
    return {"usd_per_1k": usd, "usd_per_hour": price,
            "basis": f"measured {examples_per_s:.2f} predictions/s (batched) on {what} at ${price:g}/h ({source})"}

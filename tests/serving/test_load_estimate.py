"""The load-shedding estimate counts the work already running, and follows a slowdown while a batch is still running.

The engine is built but not started (no model loaded): its books are driven directly, on a clock the test sets.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from microtune.serving.engine import Engine, Job, Overloaded
from microtune.serving.metrics import Metrics
from microtune.serving.settings import ServeSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _engine(tokenizer: Any) -> tuple[Engine, Clock]:
    engine = Engine(ServeSettings(registry=False, timeout_s=5), None, tokenizer, None, Metrics())  # type: ignore[arg-type]
    engine.clock = clock = Clock()
    return engine, clock


def _queue(engine: Engine, n: int) -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    for _ in range(n):
        engine.queue.put_nowait(Job("classify", "m", [1], loop, loop.create_future()))
    return loop


def test_a_batch_overrunning_its_estimate_raises_the_expected_wait_before_it_ends(tokenizer: Any) -> None:
    engine, clock = _engine(tokenizer)
    engine.prime_service_time(0.1)  # measured uncontended: 0.1 s per request
    loop = _queue(engine, 3)
    engine._busy = (clock.now, 4)  # a batch of 4 starts
    assert engine.expected_wait() == pytest.approx(3 * 0.1 + 4 * 0.1)  # the queue + the rest of the batch in progress
    clock.now += 1.0  # a second later (other processes took the CPU) the batch is still running: 0.25 s per request at least
    assert engine.expected_wait() == pytest.approx(3 * 0.25)
    clock.now += 9.0  # 10 s in: 2.5 s per request, 3 queued → 7.5 s, past the 5 s timeout: shed now, not when the batch ends
    with pytest.raises(Overloaded) as info:
        engine.submit(Job("classify", "m", [1], loop, loop.create_future()))
    assert info.value.retry_after == 3
    loop.close()


def test_running_generations_add_a_step_round_to_the_wait(tokenizer: Any) -> None:
    engine, _ = _engine(tokenizer)
    engine.prime_service_time(0.1)
    engine._measured_round(0.5)
    loop = _queue(engine, 2)
    assert engine.expected_wait() == pytest.approx(0.2)  # nothing generating: the queue only
    engine.running[1] = ("", Job("generate", "m", [1], loop, loop.create_future()))
    assert engine.expected_wait() == pytest.approx(0.2 + 0.5)  # the worker finishes the current step round first
    loop.close()

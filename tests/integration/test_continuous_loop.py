"""The continuous loop end to end, as a user runs it: a real `microtune serve` process serves a model from the
registry; `microtune watch --once` ingests an inbox file, retrains with watch's default method (QLoRA), the gate
promotes the challenger, and the running server answers with the new champion — through the official `openai`
client, without a restart. Once for a `classify` model (the inbox brings a new label), once for `extract`. Both run in `make test-slow` (CI).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_helpers import call, free_port
from toydata import LABELS, TEXTS, write_jsonl

pytestmark = pytest.mark.slow

NEW = [f"warranty claim {i}: the warranty expired early" for i in range(24)]
ITEMS = ["lamp", "chair", "kettle", "phone", "desk", "radio", "clock", "fan", "bike", "sofa", "oven", "shelf"]


def _classify_data(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    train = [{"text": TEXTS[label][i], "label": label} for i in range(6) for label in LABELS]
    test = [{"text": TEXTS[label][i], "label": label} for i in (6, 7) for label in LABELS]
    inbox = [{"text": text, "label": "warranty"} for text in NEW]
    return train, test, inbox


PHRASES = ["the {} arrived broken", "my {} does not work", "a {} came damaged", "the {} stopped working"]


def _extract_row(phrase: str, item: str, colour: str | None) -> dict[str, Any]:
    return {"text": phrase.format(f"{colour} {item}" if colour else item), "target": {"item": item, "colour": colour}}


def _extract_data(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    # the champion never sees a colour; the inbox teaches one, and its held-out rows score both models
    train = [_extract_row(p, item, None) for item in ITEMS[:6] for p in PHRASES[:3]]
    test = [_extract_row(PHRASES[3], item, None) for item in ITEMS[:6]]
    inbox = [_extract_row(p, item, colour) for item in ITEMS[:6] for p in PHRASES for colour in ("red", "blue")]
    return train, test, inbox


SETUP = {
    "classify": ({"type": "classify", "instruction": "Name the support topic."}, _classify_data, NEW[-1], "warranty", 6),
    "extract": ({"type": "extract", "instruction": "Extract the item and its colour.", "max_new_tokens": 48,
                 "fields": {"item": "the item that broke", "colour": "its colour, if said"}}, _extract_data, "the red lamp arrived broken", None, 1),
}


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microtune.cli", *args], capture_output=True, text=True, timeout=timeout)


# the module is slow (`make test-slow`); extract is also exhaustive (`make test-exhaustive`): the suite's time, not its reach
@pytest.mark.parametrize("task", [pytest.param(task, marks=[pytest.mark.exhaustive] if task != "classify" else []) for task in sorted(SETUP)])
def test_watch_promotes_and_the_running_server_answers_the_new_champion(tmp_path: Path, tiny_model_dir: Path, task: str) -> None:
    from openai import OpenAI

    section, data, probe, expected, epochs = SETUP[task]
    train, test, inbox_rows = data(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    (tmp_path / "inbox").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "loop", "task": section, "model": {"base": str(tiny_model_dir)},
        "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}},
        "train": {"epochs": epochs, "batch_size": 4, "max_seq_len": 64, "lr": 2e-2, "bf16": False},
        "eval": {"shots": 1, "batch_size": 8, "latency_examples": 1},
        "gate": {"latency_ratio": 100.0},  # the tiny model's latency is noise; the gate's quality rules decide
        # retrain with watch's default method, QLoRA, and longer: NF4 costs a random tiny model more than a real one
        "watch": {"inbox": "inbox", "min_new_rows": 8, "new_label_min_rows": 3, "holdout": 0.5,
                  "retrain": ["method.kind=qlora", "train.epochs=12"]},
    }, sort_keys=False))
    ws = tmp_path / "ws"
    first = _cli("run", str(recipe), "-w", str(ws))
    assert first.returncode == 0, first.stderr[-3000:]

    port = free_port()
    # --timeout: not what is tested here; a loaded CI machine must not turn a slow first answer into a 504
    server = subprocess.Popen([sys.executable, "-m", "microtune.cli", "serve", "--base", str(tiny_model_dir), "-w", str(ws),
                               "--port", str(port), "--poll", "0.5", "--timeout", "900"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120  # a safety net against a hang, not part of what is tested
        while (status := _health(url)) != 200:
            assert server.poll() is None and time.monotonic() < deadline, f"server did not come up ({status})"
            time.sleep(0.2)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        before = client.chat.completions.create(model="loop", messages=[{"role": "user", "content": probe}])
        assert before.system_fingerprint == "loop/1"

        write_jsonl(tmp_path / "inbox" / "new.jsonl", inbox_rows)
        watched = _cli("watch", str(recipe), "-w", str(ws), "--once")
        assert watched.returncode == 0, watched.stderr[-3000:]
        assert "promote" in watched.stdout, watched.stdout[-3000:]
        version = json.loads((ws / "loop" / "decisions" / "v2.json").read_text())
        assert version["verdict"] == "promote"

        deadline = time.monotonic() + 120
        while (after := client.chat.completions.create(model="loop", messages=[{"role": "user", "content": probe}])).system_fingerprint != "loop/2":
            assert time.monotonic() < deadline, "the server did not pick up the promoted champion"
            time.sleep(0.2)
        content = after.choices[0].message.content
        if expected is not None:
            assert content == expected
        else:
            assert set(json.loads(content)) == {"item", "colour"}
    finally:
        server.terminate()
        server.communicate(timeout=60)


def _health(url: str) -> int | None:
    try:
        return call("GET", url + "/health")[0]
    except OSError:
        return None

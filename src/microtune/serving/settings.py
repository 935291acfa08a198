"""Settings of `microtune serve`: every knob typed and documented, built by the CLI from its options.

    settings = ServeSettings(base="smollm2-135m-instruct", adapters={"intents": "runs/adapter"}, port=8000)

Unknown keys are errors (``extra="forbid"``), like the recipe's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from microtune.core.errors import InputError, Problem
from microtune.core.names import NAME_RULE, is_valid_name

# The batcher takes requests that follow each other by less than the batching window, for at most this many windows
# after the first: a burst of returning clients fills one batch (benchmarks/serve_load.py, BENCHMARKS.md), a trickle
# cannot hold a batch open for long.
WINDOWS_PER_BATCH = 8


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base: str | None = Field(None, description="Base model (alias, folder, .gguf or hub id); default: the base of the first adapter, "
                                                "else `smollm2-135m-instruct`.")
    adapters: dict[str, Path] = Field(default_factory=dict, description="Micro-models from adapter folders: model name → folder.")
    registry: bool = Field(True, description="Resolve other model names in the MLflow registry (`name`, `name@alias`, `name/version`).")
    tracking_uri: str | None = Field(None, description="MLflow store of the registry; default: $MLFLOW_TRACKING_URI, else the workspace's.")
    workspace: Path | None = Field(None, description="Workspace whose MLflow store is the registry when no tracking URI is given.")
    host: str = Field("127.0.0.1", description="Interface to listen on; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys; empty and no $MICROTUNE_API_KEYS: no auth.")
    max_loaded: int = Field(8, ge=1, description="Micro-models kept in memory at once (adapters and own model instances); the least "
                                                 "recently used is unloaded.")
    max_memory_mb: int = Field(4096, ge=1, description="Memory budget of the loaded micro-models beyond the base (adapter weights, own "
                                                       "model instances: parameters + buffers); the least recently used go first.")
    qlora_base: Literal["full", "4bit"] = Field("full", description="qlora adapters: `full` runs them on the shared full-precision base "
                                                                    "in mixed batches; `4bit` on their own 4-bit base, as trained.")
    max_batch: int = Field(32, ge=1, description="Requests answered in one forward pass at most.")
    batch_window_ms: float = Field(10.0, ge=0, description="How long the batcher waits for one more request: "
        f"it keeps taking requests while each follows the previous within this time (up to max_batch, and {WINDOWS_PER_BATCH} windows "
        "from the first).")
    max_queue: int = Field(256, ge=1, description="Requests waiting at most; more answer 429.")
    max_tokens: int = Field(512, ge=1, description="Largest `max_tokens` a request may ask for (free generation).")
    max_prompt_tokens: int = Field(2048, ge=16, description="Longest prompt in tokens a generation request may send.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body; larger answers 413.")
    timeout_s: float = Field(60.0, ge=0.001, description="Per-request timeout (queue + compute); past it the request answers 504.")
    poll_s: float = Field(5.0, ge=0, description="Seconds between registry alias checks (hot reload); 0 turns polling off.")
    bf16: Literal["auto"] | bool = Field("auto", description="bf16 autocast: `auto` where the hardware has native bf16.")


def read_api_keys(key_file: Path | None) -> list[str]:
    """Keys from $MICROTUNE_API_KEYS (comma-separated) and a key file (one per line, `#` comments)."""
    keys = [k.strip() for k in os.environ.get("MICROTUNE_API_KEYS", "").split(",") if k.strip()]
    if key_file is not None:
        if not Path(key_file).is_file():
            raise InputError(f"--api-key-file: {key_file} is not a file", hint="write one key per line into a file and pass its path")
        lines = Path(key_file).read_text().splitlines()
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise InputError(f"--api-key-file: {key_file} holds no key", hint="write one key per line (lines starting with # are comments)")
    return keys


def parse_adapter_options(items: list[str]) -> dict[str, Path]:
    """``name=PATH`` pairs of `--adapter`; every bad one is reported at once."""
    out: dict[str, Path] = {}
    problems = []
    for i, item in enumerate(items):
        name, sep, path = item.partition("=")
        where = f"--adapter #{i + 1}"
        if not sep or not path:
            problems.append(Problem(where, "expected NAME=PATH", repr(item)))
        elif not is_valid_name(name):
            problems.append(Problem(where, f"the name must be {NAME_RULE}", repr(name)))
        elif name in out:
            problems.append(Problem(where, "the name is given twice", repr(name)))
        else:
            out[name] = Path(path)
    if problems:
        raise InputError("bad --adapter options", problems=problems, hint="pass e.g. --adapter intents=.microtune/intents/adapters/RUN")
    return out

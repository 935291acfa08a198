"""The export step: an adapter artifact merged into its base model and/or bundled for vLLM (`microtune export`).

    written = export(".microtune/toy/adapters/RUN", merge="out/toy-merged", vllm="out/toy-vllm")
"""
from __future__ import annotations

from pathlib import Path

from microtune.models.export import export_adapter


def export(adapter: str | Path, merge: str | Path | None = None, vllm: str | Path | None = None, *,
           dtype: str | None = None, name: str | None = None, force: bool = False) -> dict[str, Path]:
    """Write the exports asked for; returns ``{"merge": folder, "vllm": folder}`` for those written.

    ``merge``: one plain transformers model (weights in ``dtype``, default float32); ``vllm``: the adapter
    with ``vllm.json`` and ``serve.sh`` (LoRA module ``name``, default the recipe name). Options and
    output folders are checked before anything is written; ``force`` replaces a non-empty output folder.
    """
    return export_adapter(adapter, merge, vllm, dtype=dtype, name=name, force=force)

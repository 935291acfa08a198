"""The export step: an adapter artifact merged into its base model, bundled for vLLM and/or written as a GGUF (`microtune export`).

    written = export(".microtune/toy/adapters/RUN", merge="out/toy-merged", vllm="out/toy-vllm")
    written = export(".microtune/toy/adapters/RUN", gguf="out/toy.gguf", gguf_type="q8_0")   # + out/Modelfile
"""
from __future__ import annotations

from pathlib import Path

from microtune.models.export import export_adapter


def export(adapter: str | Path, merge: str | Path | None = None, vllm: str | Path | None = None, *,
           dtype: str | None = None, name: str | None = None, force: bool = False,
           gguf: str | Path | None = None, gguf_type: str | None = None) -> dict[str, Path]:
    """Write the exports asked for; returns ``{"merge": folder, "vllm": folder, "gguf": file, "modelfile": file}``
    for those written.

    ``merge``: one plain transformers model (weights in ``dtype``, default float32); ``vllm``: the adapter
    with ``vllm.json`` and ``serve.sh`` (LoRA module ``name``, default the recipe name); ``gguf``: the merged
    model as one GGUF file (``gguf_type`` f16 (default), bf16, q8_0 or f32; Llama architectures) with an Ollama
    ``Modelfile`` beside it. Options and outputs are checked before anything is written; ``force`` replaces
    a non-empty output folder, or an existing GGUF and Modelfile.
    """
    return export_adapter(adapter, merge, vllm, dtype=dtype, name=name, force=force, gguf=gguf, gguf_type=gguf_type)

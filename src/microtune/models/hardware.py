"""Device, precision and memory facts the engine and the predictor share.

Two of them are recipe keys resolved here, once for every place a model is loaded (models/resolve.py):
``model.dtype`` (the dtype the weights are held in) and ``model.attention`` (the attention kernel).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import resource
from typing import Any

from microtune.core.errors import RecipeError

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
FLASH_INSTALL = "pip install flash-attn --no-build-isolation"


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def bf16_supported() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(setting: str | bool) -> bool:
    """``auto``: where the hardware has native bf16 matmuls; ``True``/``False`` force it."""
    return bf16_supported() if setting == "auto" else bool(setting)


def weights_dtype(setting: str, trains_base: bool = False) -> str:
    """The dtype the weights load in: ``model.dtype``, with ``auto`` resolved for this machine.

    ``auto`` is bf16 on a CUDA device that has it, fp16 on an older CUDA device, and fp32 on a CPU: there
    bf16 autocast already runs the matmuls in bf16 (``train.bf16``), and fp32 weights keep every CPU figure
    as it was. A method that trains the base's own weights (``full``, ``trains_base``) keeps fp32 weights
    under ``auto`` on any device: AdamW steps applied to bf16 weights lose every update smaller than the
    weight's 8-bit mantissa, so full fine-tuning needs fp32 master weights (autocast still does bf16 matmuls)."""
    if setting != "auto":
        return setting
    import torch

    if trains_base or not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def precast_frozen_linears(setting: str, autocast_bf16: bool, adapter_method: bool) -> bool:
    """Whether training holds the frozen ``nn.Linear`` weights in bf16 (the rest of the base as ``model.dtype`` says).

    Under bf16 autocast a matmul with an fp32 weight first rounds the weight to bf16 — every forward, for every
    layer, and keeps that copy for backward: on a CPU the casts cost time, and the copies memory, on top of the
    fp32 weights. Rounding a frozen weight once, when the model is built, gives bit-identical matmuls (the same
    round-to-nearest cast), so loss, gradients and accuracy are those of the fp32 weights; the embeddings, norms
    and residual stream stay fp32. It applies to ``model.dtype: auto`` on a CPU (where ``auto`` loads fp32) with
    bf16 autocast on (``train.bf16``) for an adapter method; ``model.dtype: float32`` keeps every weight fp32."""
    return setting == "auto" and autocast_bf16 and adapter_method and device() == "cpu"


def flash_unavailable(dtype: str) -> str | None:
    """Why flash_attention_2 cannot run here with weights in ``dtype`` (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        return "flash_attention_2 runs on CUDA GPUs only and this machine has none"
    if importlib.util.find_spec("flash_attn") is None:
        return f"the flash_attn package is not installed ({FLASH_INSTALL})"
    if dtype not in ("bfloat16", "float16"):
        return f"the flash-attention kernel takes fp16/bf16 weights only, and model.dtype resolves to {dtype}"
    return None


def attention_impl(setting: str, dtype: str, flash_ok: bool = True) -> str | None:
    """The ``attn_implementation`` a model loads with, for ``model.attention`` and the resolved weights dtype.

    ``auto``: flash_attention_2 where it can run (CUDA, ``flash_attn`` installed, fp16/bf16 weights) and the
    caller allows it (``flash_ok``: packed training needs a block-diagonal mask, which flash attention does not
    take), else None — transformers' own default, SDPA for every model that has it (Llama does), eager
    otherwise. An explicit flash_attention_2 that cannot run is refused with the reason."""
    if setting == "auto":
        return "flash_attention_2" if flash_ok and flash_unavailable(dtype) is None else None
    if setting == "flash_attention_2" and (why := flash_unavailable(dtype)):
        raise RecipeError(f"model.attention=flash_attention_2 cannot run here: {why}",
                          hint="set model.attention: auto (SDPA) or sdpa; flash attention needs a CUDA GPU, "
                               f"`{FLASH_INSTALL}` and model.dtype bfloat16/float16 (auto on a GPU)")
    return setting


def autocast(enabled: bool) -> Any:
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device(), dtype=torch.bfloat16)


def autocast_linears(model: Any, any_dtype: bool = False) -> list[Any]:
    """The ``Linear`` layers whose weights bf16 autocast re-casts from fp32 on every forward: frozen (weight and bias),
    fp32 (any dtype with ``any_dtype``), and not the base layer of a DoRA adapter (DoRA takes the norm of base + LoRA
    weight outside the matmul, in the weight's own dtype). Holding these in bf16 — once for training
    (``training.setup.frozen_linears_to_bf16``), for the length of a call for prediction (``bf16_frozen_weights``) —
    gives the matmuls the very values autocast would (the same round-to-nearest cast): the same outputs, without the
    per-forward cast and its copy."""
    import torch

    dora = {id(m.base_layer) for m in model.modules() if hasattr(m, "base_layer") and any(getattr(m, "use_dora", {}).values())}
    return [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m) not in dora and (any_dtype or m.weight.dtype == torch.float32)
            and not any(t.requires_grad for t in (m.weight, m.bias) if t is not None)]


@contextlib.contextmanager
def bf16_frozen_weights(model: Any, enabled: bool) -> Any:
    """Hold ``autocast_linears(model)``'s weights in bf16 while inference runs under bf16 autocast (``enabled``).

    On a CPU the per-forward cast is about 40 % of a small forward of a 135M model; the outputs are bit-identical, and
    the fp32 tensors are put back on exit, so the model is unchanged for training or an fp32 caller. An LM head tied
    to the input embeddings is left fp32 (the embedding lookup must stay fp32, as autocast leaves it)."""
    import torch

    if not enabled:
        yield model
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(embeddings.weight)} if embeddings is not None else set()
    held = [(t, t.data) for m in autocast_linears(model) for t in (m.weight, m.bias) if t is not None and id(t) not in tied]
    try:
        for tensor, data in held:
            tensor.data = data.to(torch.bfloat16)
        yield model
    finally:
        for tensor, data in held:
            tensor.data = data


def drop_file_pages(tensors: list[Any]) -> int:
    """Drop from this process's memory the pages of ``tensors`` that are mapped from a file; returns the bytes advised.

    A checkpoint loaded as stored (a bf16 safetensors file) leaves its weights as views of the file's memory map. When
    training replaces some of them by copies (``training.fuse``: q/k/v and gate/up side by side in one new tensor), the
    originals' pages stay resident as long as any other weight keeps the map open — on a 1.7B model 1.9 GiB counted
    twice. The caller must hold no further use of these tensors; even so only pages inside a file-backed mapping are
    advised (``MADV_DONTNEED``: read-only file pages are re-read from the file if ever touched again, never lost), and
    only whole pages within a tensor. Linux only; elsewhere nothing is done."""
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux") or not tensors:
        return 0
    mapped = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):  # a mapping of a file (inode ≠ 0)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                mapped.append((lo, hi))
    page, libc, advised = mmap.PAGESIZE, ctypes.CDLL(None, use_errno=True), 0
    for tensor in tensors:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo and any(a <= lo and hi <= b for a, b in mapped):
            if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
                advised += hi - lo
    return advised


MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

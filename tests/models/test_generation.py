"""The continuous-batching generator: each row's greedy answer is model.generate's for that row alone, whatever joins or
leaves the batch; seeded sampling, stop strings, streaming, cancellation, mixed adapters and prompt tuning."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from microtune.models.generation import BASE_ADAPTER, BatchGenerator, GenRequest

STOP = 2  # <|im_end|> in the bundled tokenizer


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _prompts(tokenizer: Any) -> list[list[int]]:
    texts = ["hello there", "a much longer prompt about a parcel that never arrived at my door", "refund?",
             "the invoice shows the wrong tax for the second month", "x"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _alone(model: Any, prompt: list[int], n: int, stops: set[int] | None = None) -> list[int]:
    """``model.generate``'s greedy continuation of one prompt, no padding: the reference."""
    import torch

    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=sorted(stops) if stops else None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_rows_equal_generate_alone_while_rows_join_and_leave(tiny_model: Any, tokenizer: Any) -> None:
    prompts = _prompts(tokenizer)
    lengths = [7, 12, 3, 9, 5]  # rows end at different steps
    gen = BatchGenerator(tiny_model, pad_id=0, max_batch=3)
    reqs = [GenRequest(p, n) for p, n in zip(prompts, lengths)]
    done = {}
    gen.add(reqs[0])
    gen.add(reqs[1])
    for f in gen.step() + gen.step():  # two rows running, then more join mid-way (one waits for a free slot)
        done[id(f.request)] = f
    for r in reqs[2:]:
        gen.add(r)
    while gen.has_work:
        assert len(gen.rows) <= 3
        done.update((id(f.request), f) for f in gen.step())
    for r, p, n in zip(reqs, prompts, lengths):
        f = done[id(r)]
        assert f.ids == _alone(tiny_model, p, n)
        assert f.finish_reason == "length" and len(f.ids) == n
    assert gen.cache is None and not gen.rows  # every row left and took its cache rows with it


def test_each_row_stops_at_its_own_stop_id(tiny_model: Any, tokenizer: Any) -> None:
    prompts = _prompts(tokenizer)
    free = [_alone(tiny_model, p, 6) for p in prompts]
    stops = [{ids[2]} for ids in free]  # each row's own third token ends it
    done = BatchGenerator(tiny_model, pad_id=0).run([GenRequest(p, 6, stop_ids=s) for p, s in zip(prompts, stops)])
    for f, ids in zip(done, free):
        assert f.finish_reason == "stop"
        assert f.ids == ids[: ids.index(ids[2]) + 1]  # up to and including the first occurrence of the stop id


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(tiny_model: Any, tokenizer: Any) -> None:
    prompts = _prompts(tokenizer)
    ask = lambda: GenRequest(prompts[0], 10, temperature=1.0, top_p=0.9, seed=7)  # noqa: E731
    alone = BatchGenerator(tiny_model, pad_id=0).run([ask()])[0].ids
    crowd = [GenRequest(p, 8, temperature=1.3, seed=i) for i, p in enumerate(prompts[1:])]
    mixed = BatchGenerator(tiny_model, pad_id=0).run([*crowd, ask()])[-1].ids
    other_seed = BatchGenerator(tiny_model, pad_id=0).run([GenRequest(prompts[0], 10, temperature=1.0, top_p=0.9, seed=8)])[0].ids
    assert mixed == alone
    assert other_seed != alone  # the seed matters: sampling really happened


def test_top_p_near_zero_is_greedy(tiny_model: Any, tokenizer: Any) -> None:
    prompt = _prompts(tokenizer)[1]
    sampled = BatchGenerator(tiny_model, pad_id=0).run([GenRequest(prompt, 6, temperature=1.0, top_p=1e-6, seed=1)])[0]
    assert sampled.ids == _alone(tiny_model, prompt, 6)


def test_stop_string_cuts_the_answer_and_the_stream_matches(tiny_model: Any, tokenizer: Any) -> None:
    prompt = _prompts(tokenizer)[3]
    full = BatchGenerator(tiny_model, pad_id=0, tokenizer=tokenizer).run([GenRequest(prompt, 16)])[0].text
    assert len(full) > 6
    stop = full[4:6]
    pieces: list[str] = []
    f = BatchGenerator(tiny_model, pad_id=0, tokenizer=tokenizer).run(
        [GenRequest(prompt, 16, stop_strings=[stop], on_text=pieces.append)])[0]
    assert f.finish_reason == "stop"
    assert f.text == full[: full.index(stop)]
    assert "".join(pieces) == f.text  # nothing of the stop string was streamed


def test_streamed_pieces_add_up_to_the_text(tiny_model: Any, tokenizer: Any) -> None:
    pieces: list[str] = []
    f = BatchGenerator(tiny_model, pad_id=0, tokenizer=tokenizer).run([GenRequest(_prompts(tokenizer)[0], 20, on_text=pieces.append)])[0]
    assert "".join(pieces) == f.text == tokenizer.decode(f.ids, skip_special_tokens=True)
    assert len(pieces) > 1


def test_incremental_decoding_never_splits_a_character(tokenizer: Any) -> None:
    from microtune.models.generation import _Text

    ids = tokenizer("café → 東京 ✓", add_special_tokens=False)["input_ids"]
    text, pieces = _Text(tokenizer, []), []
    for t in ids:
        text.push(t)
        pieces.append(text.ready())
    pieces.append(text.finish())
    assert "".join(pieces) == "café → 東京 ✓"
    assert all("\ufffd" not in p for p in pieces)


def test_cancelled_rows_leave_and_the_others_go_on(tiny_model: Any, tokenizer: Any) -> None:
    prompts = _prompts(tokenizer)
    gen = BatchGenerator(tiny_model, pad_id=0)
    a, b, c = (gen.add(GenRequest(p, 8)) for p in prompts[:3])
    c.cancel()  # before it ever ran
    first = gen.step()
    assert [(f.request, f.finish_reason) for f in first] == [(c, "cancelled")]
    a.cancel()
    out = {id(f.request): f for f in gen.step()}
    assert out[id(a)].finish_reason == "cancelled" and len(out[id(a)].ids) == 1
    while gen.has_work:
        out.update((id(f.request), f) for f in gen.step())
    assert out[id(b)].ids == _alone(tiny_model, prompts[1], 8)


def test_bad_requests_fail_at_add(tiny_model: Any) -> None:
    gen = BatchGenerator(tiny_model, pad_id=0)
    for bad, says in [(GenRequest([], 4), "prompt is empty"), (GenRequest([5], 0), "max_new_tokens"),
                      (GenRequest([5], 4, temperature=-1), "temperature"), (GenRequest([5], 4, top_p=0), "top_p")]:
        with pytest.raises(ValueError, match=says):
            gen.add(bad)
    gen.add(GenRequest([5], 4, adapter="a"))
    with pytest.raises(ValueError, match="mixes requests with and without an adapter"):
        gen.add(GenRequest([5], 4))


def _lora(model_dir: Path, names: list[str]) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


@pytest.mark.slow
def test_mixed_adapter_batch_equals_each_adapter_alone(tiny_model_dir: Path, tokenizer: Any) -> None:
    model = _lora(tiny_model_dir, ["a", "b"])
    prompts = _prompts(tokenizer)[:4]
    names = ["a", "b", BASE_ADAPTER, "b"]
    done = BatchGenerator(model, pad_id=0).run([GenRequest(p, 6, adapter=n) for p, n in zip(prompts, names)])
    for f, p, n in zip(done, prompts, names):
        if n == BASE_ADAPTER:
            with model.disable_adapter():
                ref = _alone(model, p, 6)
        else:
            model.set_adapter(n)
            ref = _alone(model, p, 6)
        assert f.ids == ref
    assert len({tuple(f.ids) for f in done[:3]}) == 3  # the adapters really differ


def _recomputed(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy by a full forward per token, one row, no cache: the reference for prompt learning (PEFT's own
    ``generate`` with a cache disagrees with its full forward for these under transformers 5.x)."""
    import torch

    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq]), attention_mask=torch.ones((1, len(seq)), dtype=torch.long)).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_falls_back_to_recomputing_and_matches_generate(tiny_model_dir: Path, tokenizer: Any, kind: str) -> None:
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(2)
    cfg = (PromptTuningConfig if kind == "prompt_tuning" else PrefixTuningConfig)(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    model = get_peft_model(base, cfg).eval()
    with torch.no_grad():  # random virtual tokens, so the adapter changes the answers
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    gen = BatchGenerator(model, pad_id=0)
    assert not gen.cached
    prompts = _prompts(tokenizer)[:3]
    done = gen.run([GenRequest(p, 5) for p in prompts])
    for f, p in zip(done, prompts):
        assert f.ids == _recomputed(model, p, 5)
    with model.disable_adapter():
        plain = _alone(model, prompts[1], 5)
    assert plain != done[1].ids

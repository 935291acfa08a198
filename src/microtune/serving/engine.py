"""The serving engine: one base model in memory, many LoRA adapters, requests batched across adapters.

    engine = Engine(settings, catalog, tokenizer, base_ref, metrics); engine.start()
    job = engine.classify(spec, prompt_ids, loop) ; engine.submit(job) ; label, prob = await job.future

One worker thread owns the model (PEFT adapters are loaded, evicted and run only there, so no lock
is needed around the weights). It takes the first waiting request, waits up to the batching window
for more, and answers every `classify` request of the batch in one mixed-adapter forward pass per
decoding step (each row names its adapter: PEFT's ``adapter_names``). Free generation (the base
model) runs one request at a time in the same loop, streaming text through a callback. Adapters are
kept in an LRU of ``max_loaded``; a batch that needs more distinct adapters is split.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from microtune.models.decoding import LabelPredictor, build_trie
from microtune.models.hardware import autocast, device, use_bf16
from microtune.serving.catalog import BASE, AdapterSpec, Catalog
from microtune.serving.metrics import Metrics
from microtune.serving.settings import ServeSettings
from microtune.tasks.render import Renderer

log = logging.getLogger("microtune.serving")


class QueueFull(Exception):
    """More requests wait than ``max_queue`` (HTTP 429)."""


@dataclass
class Job:
    kind: str  # "classify" | "generate"
    spec: AdapterSpec | str
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    params: dict[str, Any] = field(default_factory=dict)
    on_text: Any = None  # generation: called (in the event loop) with each new piece of text
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def adapter(self) -> str:
        return self.spec.key if isinstance(self.spec, AdapterSpec) else BASE

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value, error)


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the request timed out or the client left
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Engine:
    def __init__(self, settings: ServeSettings, catalog: Catalog, tokenizer: Any, base_ref: Any, metrics: Metrics):
        self.settings, self.catalog, self.tok, self.base_ref, self.metrics = settings, catalog, tokenizer, base_ref, metrics
        self.renderer = Renderer(tokenizer)
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self.loaded: OrderedDict[str, AdapterSpec] = OrderedDict()
        self.tries: dict[str, dict[int, Any]] = {}
        self.model: Any = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.bf16 = use_bf16(settings.bf16)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="microtune-engine", daemon=True)
        metrics.watch(self.queue.qsize, lambda: len(self.loaded))

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish every queued request, then end the worker."""
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.qsize()} requests are waiting (max_queue {self.settings.max_queue})") from None

    def _run(self) -> None:
        try:
            self._load_base()
        except BaseException as exc:  # /health reports it; requests keep answering 503
            self.load_error = exc
            log.exception("loading the base model failed")
            return
        self.ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _load_base(self) -> None:
        from microtune.models import load_model

        self.model = load_model(self.base_ref).to(device()).eval()

    def _next_batch(self) -> list[Job] | None:
        """The first waiting job plus whatever arrives within the batching window (up to max_batch)."""
        while True:
            try:
                first = self.queue.get(timeout=0.05)
                break
            except queue.Empty:
                if self._stopping.is_set():
                    return None
        batch, deadline = [first], time.monotonic() + self.settings.batch_window_ms / 1000
        while len(batch) < self.settings.max_batch:
            try:
                batch.append(self.queue.get(timeout=max(deadline - time.monotonic(), 0)) if time.monotonic() < deadline
                             else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    # -- execution --------------------------------------------------------------------------------
    def _execute(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled]
        classify = [j for j in live if j.kind == "classify"]
        if classify:
            self.metrics.batch_size.labels("classify").observe(len(classify))
        for group in self._groups(classify):
            self._guarded(group, self._classify)
        for job in (j for j in live if j.kind == "generate"):
            self.metrics.batch_size.labels("generate").observe(1)
            self._guarded([job], lambda jobs: self._generate(jobs[0]))

    def _guarded(self, jobs: list[Job], fn: Any) -> None:
        try:
            fn(jobs)
        except Exception as exc:  # one failing batch must not end the worker; its requests answer 500
            log.exception("batch of %d failed", len(jobs))
            for job in jobs:
                job.resolve(error=exc)

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Split a batch so no group needs more distinct adapters than the LRU may hold at once."""
        groups: list[list[Job]] = []
        adapters: list[set[str]] = []
        for job in jobs:
            for group, names in zip(groups, adapters):
                if job.adapter in names or len(names) < self.settings.max_loaded:
                    group.append(job)
                    names.add(job.adapter)
                    break
            else:
                groups.append([job])
                adapters.append({job.adapter})
        return groups

    def _classify(self, jobs: list[Job]) -> None:
        specs = [j.spec for j in jobs]
        self._ensure_loaded(specs)  # type: ignore[arg-type]
        predictor = LabelPredictor(self.model, self.renderer, [], batch_size=self.settings.max_batch, bf16=self.bf16)
        preds = predictor.predict([j.prompt for j in jobs], adapter_names=[j.adapter for j in jobs],
                                  tries=[self._trie(s) for s in specs])  # type: ignore[arg-type]
        for job, pred in zip(jobs, preds):
            job.resolve(pred)

    def _trie(self, spec: AdapterSpec) -> dict[int, Any]:
        if spec.key not in self.tries:
            self.tries[spec.key] = build_trie({label: self.renderer.completion_ids(label) for label in spec.labels})
        return self.tries[spec.key]

    def _ensure_loaded(self, specs: list[AdapterSpec]) -> None:
        """Load missing adapters, then unload the least recently used beyond max_loaded (never one this batch needs)."""
        from peft import PeftModel

        needed = {s.key for s in specs}
        for spec in {s.key: s for s in specs}.values():
            if spec.key in self.loaded:
                self.loaded.move_to_end(spec.key)
                continue
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(spec.path), adapter_name=spec.key)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(spec.path), adapter_name=spec.key)
            self.model.eval()
            self.loaded[spec.key] = spec
            self.metrics.adapter_events.labels("load").inc()
            log.info("loaded adapter %s (%s)", spec.fingerprint, spec.path)
        for key in [k for k in self.loaded if k not in needed][: max(len(self.loaded) - self.settings.max_loaded, 0)]:
            with warnings.catch_warnings():  # "the active adapter was deleted": rows always name their adapter, none is "active"
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.model.delete_adapter(key)
            self.tries.pop(key, None)
            evicted = self.loaded.pop(key)
            self.metrics.adapter_events.labels("evict").inc()
            log.info("unloaded adapter %s (least recently used)", evicted.fingerprint)

    def _generate(self, job: Job) -> None:
        import torch
        from peft import PeftModel
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):  # a timed-out request stops generating at the next token
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), job.cancelled, dtype=torch.bool, device=input_ids.device)

        p = job.params
        kwargs: dict[str, Any] = {"max_new_tokens": p["max_tokens"], "pad_token_id": self.tok.pad_token_id,
                                  "eos_token_id": p["eos"], "stopping_criteria": StoppingCriteriaList([Cancelled()])}
        if p.get("temperature", 0) > 0:
            kwargs.update(do_sample=True, temperature=p["temperature"], top_p=p.get("top_p") or 1.0)
            if p.get("seed") is not None:
                torch.manual_seed(p["seed"])
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if p.get("stop"):
            kwargs.update(stop_strings=p["stop"], tokenizer=self.tok)
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [job.adapter]
        if job.on_text is not None:
            kwargs["streamer"] = _streamer(self.tok, lambda text: job.loop.call_soon_threadsafe(job.on_text, text))
        ids = torch.tensor([job.prompt], device=device())
        with torch.no_grad(), autocast(self.bf16):
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out[0, len(job.prompt):].tolist()
        job.resolve({"ids": new, "finish_reason": self._finish_reason(new, p)})

    def _finish_reason(self, new: list[int], p: dict[str, Any]) -> str:
        if new and new[-1] in p["eos"]:
            return "stop"
        text = self.tok.decode(new, skip_special_tokens=True)
        if any(text.endswith(s) for s in p.get("stop") or []):
            return "stop"
        return "length"


def _streamer(tokenizer: Any, emit: Any) -> Any:
    """A transformers TextStreamer (its incremental decoding) that hands each finished text piece to ``emit``."""
    from transformers import TextStreamer

    class Emit(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    return Emit(tokenizer, skip_prompt=True, skip_special_tokens=True)

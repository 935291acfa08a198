"""The serving engine: one base model in memory, micro-models of every method on it or beside it, requests batched.

    engine = Engine(settings, catalog, tokenizer, base_ref, metrics); engine.start()
    job = Job("classify", spec, prompt_ids, loop, loop.create_future()); engine.submit(job)
    answer = await job.future          # {"label", "prob", "top"}

One worker thread owns every model (adapters and instances are loaded, evicted and run only there, so
no lock is needed around the weights). It takes the first waiting request, waits up to the batching
window for more, and groups the batch by **model instance** (catalog.placement): the shared base
answers all its LoRA adapters (lora, rslora, qlora on the full-precision base) in one mixed-adapter
forward per decoding step (each row names its adapter: PEFT's ``adapter_names``); a DoRA adapter runs
on the shared base in a group of its own (``set_adapter``); a model with its own instance (full, IA3,
prompt/prefix tuning, qlora on its 4-bit base) answers its group with its own forwards. Free generation
(the base model) runs one request at a time, streaming text through a callback; ``_generate`` is the
place a generation runner per model instance plugs in. Everything loaded beyond the base is one LRU
(``residency``) under ``max_loaded`` entries and ``max_memory_mb``.

Load shedding: the engine keeps an EWMA of the service time per request (a batch's time over its
size); ``submit`` refuses a request whose expected wait (queue length × that time) is past its timeout
(``Overloaded``, HTTP 429 with Retry-After) instead of letting it time out in the queue.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import math
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from microtune.models.decoding import LabelPredictor, build_trie
from microtune.models.hardware import autocast, device, use_bf16
from microtune.serving.catalog import ALONE, BASE, MIXED, OWN, AdapterSpec, Catalog
from microtune.serving.metrics import Metrics
from microtune.serving.residency import MB, Residency, Resident, adapter_bytes, model_bytes
from microtune.serving.settings import ServeSettings
from microtune.tasks.render import Renderer

log = logging.getLogger("microtune.serving")


class QueueFull(Exception):
    """More requests wait than ``max_queue`` (HTTP 429)."""


class Overloaded(Exception):
    """The expected wait of a new request is past its timeout (HTTP 429 with Retry-After: shed at once, not a 504 later)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


EWMA_WEIGHT = 0.2  # weight of the newest batch in the service-time estimate: steady, yet follows a load change in ~10 batches


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
        self.residency = Residency(settings.max_loaded, settings.max_memory_mb * MB)
        self.tries: dict[str, dict[int, Any]] = {}
        self.model: Any = None  # the shared base (a PeftModel once a LoRA-type adapter is on it)
        self.base_bytes = 0
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.bf16 = use_bf16(settings.bf16)
        self._service: float | None = None  # EWMA of seconds per request
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="microtune-engine", daemon=True)
        metrics.watch(self.queue.qsize, lambda: len(self.residency), lambda: self.residency.nbytes)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish every queued request, then end the worker."""
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once: ``QueueFull`` past ``max_queue``, ``Overloaded`` when it would wait past its timeout."""
        wait = self.expected_wait()
        if wait > self.settings.timeout_s:
            retry = max(1, math.ceil(wait - self.settings.timeout_s))
            raise Overloaded(f"{self.queue.qsize()} requests are waiting, about {wait:.1f}s of work, more than the "
                             f"{self.settings.timeout_s:g}s timeout", retry)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.qsize()} requests are waiting (max_queue {self.settings.max_queue})") from None

    # -- load shedding ----------------------------------------------------------------------------
    @property
    def service_time(self) -> float | None:
        """Seconds of work per request (EWMA over batches); None until the first batch (or ``prime_service_time``)."""
        return self._service

    def prime_service_time(self, seconds: float) -> None:
        """Set the estimate (a warm-up measurement, or a test); later batches move it as usual."""
        self._service = float(seconds)

    def expected_wait(self) -> float:
        """Seconds a request queued now would wait before its batch starts: queue length × service time per request."""
        return self.queue.qsize() * (self._service or 0.0)

    def _measured(self, seconds: float, requests: int) -> None:
        per = seconds / max(requests, 1)
        self._service = per if self._service is None else EWMA_WEIGHT * per + (1 - EWMA_WEIGHT) * self._service

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
        self.base_bytes = model_bytes(self.model)

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
            for jobs in self._by_instance(group):
                self._guarded(jobs, self._classify)
        for job in (j for j in live if j.kind == "generate"):
            self.metrics.batch_size.labels("generate").observe(1)
            self._guarded([job], lambda jobs: self._generate(jobs[0]))

    def _guarded(self, jobs: list[Job], fn: Any) -> None:
        start = time.perf_counter()
        try:
            fn(jobs)
        except Exception as exc:  # one failing batch must not end the worker; its requests answer 500
            log.exception("batch of %d failed", len(jobs))
            for job in jobs:
                job.resolve(error=exc)
        self._measured(time.perf_counter() - start, len(jobs))

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Split a batch so no group needs more distinct models than the LRU may hold at once."""
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

    @staticmethod
    def _by_instance(jobs: list[Job]) -> list[list[Job]]:
        """The jobs of each model instance, in order of arrival: every mixed adapter's rows together (the shared base
        answers them in one forward per step), each DoRA adapter and each own instance apart."""
        out: dict[str, list[Job]] = {}
        for job in jobs:
            spec: AdapterSpec = job.spec  # type: ignore[assignment]
            out.setdefault("" if spec.place == MIXED else spec.key, []).append(job)
        return list(out.values())

    def _instance(self, jobs: list[Job]) -> tuple[Any, list[str] | None]:
        """``(model, per-row adapter names or None)`` that answers these jobs (all of one instance, all loaded)."""
        spec: AdapterSpec = jobs[0].spec  # type: ignore[assignment]
        if spec.place == MIXED:
            return self.model, [j.adapter for j in jobs]
        if spec.place == ALONE:
            self.model.set_adapter(spec.key)  # rows of a DoRA adapter cannot be named per row: make it the active one
            return self.model, None
        return self.residency.entries[spec.key].model, None

    def _classify(self, jobs: list[Job]) -> None:
        specs = [j.spec for j in jobs]
        self._ensure_loaded(specs)  # type: ignore[arg-type]
        model, names = self._instance(jobs)
        predictor = LabelPredictor(model, self.renderer, [], batch_size=self.settings.max_batch, bf16=self.bf16)
        tries = [self._trie(s) for s in specs]  # type: ignore[arg-type]
        preds = predictor.predict([j.prompt for j in jobs], adapter_names=names, tries=tries)
        for i, (job, (label, prob)) in enumerate(zip(jobs, preds)):
            top = None
            if job.params.get("top_logprobs"):
                top = predictor.answer_logprobs(job.prompt, tries[i], names[i] if names else None)[: job.params["top_logprobs"]]
            job.resolve({"label": label, "prob": prob, "top": top})

    def _trie(self, spec: AdapterSpec) -> dict[int, Any]:
        """The decoder's trie over the model's answers: its labels, or its label sets (multi-label), as eval decodes."""
        if spec.key not in self.tries:
            self.tries[spec.key] = build_trie({answer: self.renderer.completion_ids(answer) for answer in spec.answers})
        return self.tries[spec.key]

    def _ensure_loaded(self, specs: list[AdapterSpec]) -> None:
        """Load what this group needs, then unload least recently used entries (never one it needs) past the limits."""
        needed = {s.key: s for s in specs}
        for spec in needed.values():
            if spec.key in self.residency:
                self.residency.touch(spec.key)
            else:
                self._load(spec)
        for key in self.residency.victims(needed):
            self._unload(key)
        self._active_loaded()
        if self.residency.nbytes > self.residency.max_bytes:
            log.warning("the models of one batch need %.1f MB, over max_memory_mb=%d", self.residency.nbytes / MB,
                        self.settings.max_memory_mb)

    def _active_loaded(self) -> None:
        """PEFT keeps a deleted adapter's name as the model's active adapter (also after another is loaded), and every
        later ``active_peft_config`` read (the decoders, ``get_base_model``) then fails with a KeyError: point it at one
        that is loaded. Mixed rows name their adapter and DoRA sets its own, so which one is active does not matter."""
        from peft import PeftModel

        model = self.model
        if isinstance(model, PeftModel) and model.peft_config and model.active_adapter not in model.peft_config:
            model.set_adapter(next(iter(model.peft_config)))

    def _load(self, spec: AdapterSpec) -> None:
        from peft import PeftModel

        if spec.place == OWN:
            from microtune.models.trained import load_trained

            model = load_trained(self.base_ref, spec.path)  # full weights, or a private base (4-bit for qlora) + the adapter
            resident = Resident(spec.key, spec.fingerprint, spec.place, model_bytes(model), model)
        else:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(spec.path), adapter_name=spec.key)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(spec.path), adapter_name=spec.key)
            self.model.eval()
            resident = Resident(spec.key, spec.fingerprint, spec.place, adapter_bytes(self.model, spec.key))
        self.residency.add(resident)
        self.metrics.adapter_events.labels("load").inc()
        log.info("loaded %s (%s, %s, %.1f MB)", spec.fingerprint, spec.method, spec.place, resident.nbytes / MB)

    def _unload(self, key: str) -> None:
        resident = self.residency.remove(key)
        if resident.model is None:
            with warnings.catch_warnings():  # "the active adapter was deleted": mixed rows name their adapter, DoRA sets its own
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.model.delete_adapter(key)
        else:
            resident.model = None
            gc.collect()  # an own instance's weights go now, not at some later collection
        self.tries.pop(key, None)
        self.metrics.adapter_events.labels("evict").inc()
        log.info("unloaded %s (least recently used, %.1f MB)", resident.fingerprint, resident.nbytes / MB)

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

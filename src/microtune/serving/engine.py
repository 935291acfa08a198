"""The serving engine: one base model in memory, micro-models of every method on it or beside it, requests batched.

    engine = Engine(settings, catalog, tokenizer, base_ref, metrics); engine.start()
    job = Job("classify", spec, prompt_ids, loop, loop.create_future()); engine.submit(job)
    answer = await job.future          # classify: {"label", "prob", "top"}; generate: {"ids", "text", "finish_reason"}

One worker thread owns every model (adapters and instances are loaded, evicted and run only there, so
no lock is needed around the weights). Its loop interleaves the two kinds of work:

1. take the jobs waiting in the queue (when nothing is generating it waits for the first one, then up to the
   batching window for more; while rows are generating it takes what is there without waiting);
2. answer the classify jobs, grouped by **model instance** (catalog.placement): the shared base answers all
   its LoRA adapters (lora, rslora, qlora on the full-precision base) in one mixed-adapter forward per
   decoding step (each row names its adapter: PEFT's ``adapter_names``); a DoRA adapter runs on the shared
   base in a group of its own (``set_adapter``); a model with its own instance (full, IA3, prompt/prefix
   tuning, qlora on its 4-bit base) answers its group with its own forwards; each model is decoded with the scorer
   its recipe.json records (``task.scoring``: the trie walk or full-sequence log-likelihood), a group split by scorer;
3. admit the generation jobs (the base model's free text, extract and generate micro-models) into the running
   ``BatchGenerator`` of their instance — one per instance with work: the shared base (its LoRA adapters' rows
   and the base model's own rows in one batch, each row naming its adapter), each DoRA adapter (a generator
   of its own on the shared base, stepped after ``set_adapter``: PEFT refuses DoRA in ``adapter_names``), and
   each own instance;
4. one ``step()`` per generator with work (one token for every row), resolving the rows that ended — each at
   its own end of turn, stop string, JSON object's end or ``max_tokens`` — and dropping the rows whose request
   was cancelled (timed out, client left); then repeat.

So rows join and leave a running batch, and a classify request waits at most one generation step, never a
whole generation. Everything loaded beyond the base is one LRU (``residency``) under ``max_loaded`` entries and
``max_memory_mb``; an entry whose rows are generating is never evicted.

Load shedding: ``submit`` refuses a request whose expected wait is past its timeout (``Overloaded``, HTTP 429
with Retry-After) instead of letting it time out in the queue. The expected wait counts the work already
running, not only the queue: the classify batch in progress (its elapsed time raises the per-request estimate
at once when the machine slows down, without waiting for the batch to end) and one generation step round
while rows generate (its time measured at every step), plus the queue × the per-request time (an EWMA).
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
from microtune.models.generation import BASE_ADAPTER, BatchGenerator, GenRequest
from microtune.models.hardware import device, use_bf16
from microtune.serving.catalog import ALONE, BASE, MIXED, OWN, AdapterSpec, Catalog
from microtune.serving.metrics import Metrics
from microtune.serving.residency import MB, Residency, Resident, adapter_bytes, model_bytes
from microtune.serving.settings import WINDOWS_PER_BATCH, ServeSettings
from microtune.tasks.render import Renderer

log = logging.getLogger("microtune.serving")
SHARED = ""  # the generator key of the shared base (its LoRA adapters and the base model's own rows)


class QueueFull(Exception):
    """More requests wait than ``max_queue`` (HTTP 429)."""


class Overloaded(Exception):
    """The expected wait of a new request is past its timeout (HTTP 429 with Retry-After: shed at once, not a 504 later)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


EWMA_WEIGHT = 0.2  # weight of the newest measurement in the service-time estimates: steady, yet follows a load change in ~10 batches


@dataclass
class Job:
    """One request for the worker. ``params`` of a generation: ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
    ``stop`` (strings), ``eos`` (token ids that end the answer), ``constraint`` (a ``models.constrain`` constraint or None)."""

    kind: str  # "classify" | "generate"
    spec: AdapterSpec | str
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    params: dict[str, Any] = field(default_factory=dict)
    on_text: Any = None  # generation: called (in the event loop) with each new piece of text
    cancelled: bool = False  # set by the server (timeout, client left); the worker cancels the generator row
    enqueued: float = field(default_factory=time.monotonic)
    request: GenRequest | None = None  # the generator row, once admitted

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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self.residency = Residency(settings.max_loaded, settings.max_memory_mb * MB)
        self.tries: dict[str, dict[int, Any]] = {}
        self.model: Any = None  # the shared base (a PeftModel once a LoRA-type adapter is on it)
        self.base_bytes = 0
        self.gens: dict[str, BatchGenerator] = {}  # generator key (SHARED, "alone:<key>", an own instance's key) → its running batch
        self.running: dict[int, tuple[str, Job]] = {}  # id(GenRequest) → (generator key, job): the admitted generations
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.bf16 = use_bf16(settings.bf16)
        self._service: float | None = None  # EWMA of seconds per classify request
        self._round: float | None = None  # EWMA of seconds per generation step round (one step of every generator)
        self._busy: tuple[float, int] | None = None  # (start, size) of the classify batch in progress
        self.clock = time.perf_counter  # the load-shedding estimate's clock (a test sets its own)
        self._stopping = threading.Event()
        self._last_batch = 1  # jobs the batcher took last time: how many clients are likely to come back at once
        self._thread = threading.Thread(target=self._run, name="microtune-engine", daemon=True)
        metrics.watch(self.queue.qsize, lambda: len(self.residency), lambda: self.residency.nbytes)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish every queued request and every running generation, then end the worker."""
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once: ``QueueFull`` past ``max_queue``, ``Overloaded`` when it would wait past its timeout."""
        wait = self.expected_wait()
        if wait > self.settings.timeout_s:
            retry = max(1, math.ceil(wait - self.settings.timeout_s))
            raise Overloaded(f"{self.queue.qsize()} requests are waiting and {len(self.running)} generating, about {wait:.1f}s of work, "
                             f"more than the {self.settings.timeout_s:g}s timeout", retry)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.qsize()} requests are waiting (max_queue {self.settings.max_queue})") from None

    # -- load shedding ----------------------------------------------------------------------------
    @property
    def service_time(self) -> float | None:
        """Seconds of work per request (EWMA over classify batches); None until the first batch (or ``prime_service_time``)."""
        return self._service

    def prime_service_time(self, seconds: float) -> None:
        """Set the estimate (a warm-up measurement, or a test); later batches move it as usual."""
        self._service = float(seconds)

    def expected_wait(self) -> float:
        """Seconds a request queued now would wait before the worker answers or admits it: the queue × the time per
        request, the rest of the classify batch in progress, and one generation step round while rows generate.

        A batch in progress for longer than its estimate raises the per-request time at once (``elapsed / size``): under
        a sudden slowdown (other processes on the CPU) the estimate follows the batch as it runs, not only once it ends."""
        per, running = self._service or 0.0, 0.0
        busy = self._busy
        if busy is not None:
            elapsed, size = self.clock() - busy[0], busy[1]
            per = max(per, elapsed / size)
            running = max(size * per - elapsed, 0.0)
        if self.running:
            running += self._round or 0.0
        return self.queue.qsize() * per + running

    def _measured(self, seconds: float, requests: int) -> None:
        per = seconds / max(requests, 1)
        self._service = per if self._service is None else EWMA_WEIGHT * per + (1 - EWMA_WEIGHT) * self._service

    def _measured_round(self, seconds: float) -> None:
        self._round = seconds if self._round is None else EWMA_WEIGHT * seconds + (1 - EWMA_WEIGHT) * self._round

    # -- the worker loop --------------------------------------------------------------------------
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
            self._step_all()

    def _load_base(self) -> None:
        from microtune.models import load_model

        self.model = load_model(self.base_ref).to(device()).eval()
        self.base_bytes = model_bytes(self.model)

    @property
    def generating(self) -> bool:
        return any(g.has_work for g in self.gens.values())

    def _next_batch(self) -> list[Job] | None:
        """The jobs to take now: while rows generate, whatever waits (no waiting: the next step is due); otherwise the
        first job to arrive and those that follow, up to max_batch. The batch closes when no job came for one batching
        window and it holds at least as many jobs as the last batch did, or ``WINDOWS_PER_BATCH`` windows after the
        first. A lone request waits one window, as with a fixed window; clients that send their next request when their
        answer arrives come back together, and are taken together: with a fixed window, a batch once cut in two (a
        late arrival) stays cut, each part returning while the other computes, every round paying a forward's fixed
        cost twice (benchmarks/serve_load.py: 8 batches of 128 requests instead of 4). None: stop."""
        if self.generating:
            return self._drain(self.settings.max_batch)
        while True:
            try:
                first = self.queue.get(timeout=0.05)
                break
            except queue.Empty:
                if self._stopping.is_set():
                    return None
        window = self.settings.batch_window_ms / 1000
        expected = min(self._last_batch, self.settings.max_batch)
        batch, last_call = [first], time.monotonic() + WINDOWS_PER_BATCH * window
        while len(batch) < self.settings.max_batch:
            left = last_call - time.monotonic()
            wait = min(window, left) if len(batch) >= expected else left
            try:
                batch.append(self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        self._last_batch = len(batch)
        return batch

    def _drain(self, limit: int) -> list[Job]:
        out: list[Job] = []
        while len(out) < limit:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    # -- execution --------------------------------------------------------------------------------
    def _execute(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled]
        classify = [j for j in live if j.kind == "classify"]
        if classify:
            self.metrics.batch_size.labels("classify").observe(len(classify))
        for group in self._groups(classify):
            for jobs in self._by_instance(group):
                self._timed(jobs, self._classify)
        for job in (j for j in live if j.kind == "generate"):
            self._guarded([job], lambda jobs: self._admit(jobs[0]))

    def _timed(self, jobs: list[Job], fn: Any) -> None:
        """Run a classify group, its start and size visible to ``expected_wait`` while it runs; measure it after."""
        start = self.clock()
        self._busy = (start, len(jobs))
        try:
            self._guarded(jobs, fn)
        finally:
            self._busy = None
        self._measured(self.clock() - start, len(jobs))

    def _guarded(self, jobs: list[Job], fn: Any) -> None:
        try:
            fn(jobs)
        except Exception as exc:  # one failing batch must not end the worker; its requests answer 500
            log.exception("batch of %d failed", len(jobs))
            for job in jobs:
                job.resolve(error=exc)

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
        """Answer classify jobs of one instance: one predictor per scorer among them (``trie``/``loglik``, each model's own
        ``task.scoring``), so a mixed-adapter batch splits only where its models decode differently."""
        specs = [j.spec for j in jobs]
        self._ensure_loaded(specs)  # type: ignore[arg-type]
        model, names = self._instance(jobs)
        tries = [self._trie(s) for s in specs]  # type: ignore[arg-type]
        by_scoring: dict[str, list[int]] = {}
        for i, spec in enumerate(specs):
            by_scoring.setdefault(spec.scoring, []).append(i)  # type: ignore[union-attr]
        for scoring, idx in by_scoring.items():
            predictor = LabelPredictor(model, self.renderer, [], batch_size=self.settings.max_batch, bf16=self.bf16, scoring=scoring)
            self._answer([jobs[i] for i in idx], predictor, [tries[i] for i in idx], None if names is None else [names[i] for i in idx])

    @staticmethod
    def _answer(jobs: list[Job], predictor: LabelPredictor, tries: list[dict[int, Any]], names: list[str] | None) -> None:
        """Resolve each job with its label, probability and, when asked, its top answers. ``loglik``: the rows that ask
        for top answers are ranked whole (every answer scored), the others predicted with pruning (only the answers that
        can still win are scored: about 6 of 30 a row on a trained micro-model, BENCHMARKS.md "Prediction speed"); the
        trie walk scores top answers in an extra pass per asking row."""
        if predictor.scoring == "loglik":
            asking = [i for i, j in enumerate(jobs) if j.params.get("top_logprobs")]
            rest = sorted(set(range(len(jobs))) - set(asking))
            for idx, whole in ((asking, True), (rest, False)):
                if not idx:
                    continue
                prompts, rows, row_names = [jobs[i].prompt for i in idx], [tries[i] for i in idx], None if names is None else [names[i] for i in idx]
                if whole:
                    for i, answers in zip(idx, predictor.rank(prompts, adapter_names=row_names, tries=rows)):
                        jobs[i].resolve({"label": answers[0][0], "prob": math.exp(answers[0][1]),
                                         "top": answers[: jobs[i].params["top_logprobs"]]})
                else:
                    for i, (label, prob) in zip(idx, predictor.predict(prompts, adapter_names=row_names, tries=rows)):
                        jobs[i].resolve({"label": label, "prob": prob, "top": None})
            return
        prompts = [j.prompt for j in jobs]
        preds = predictor.predict(prompts, adapter_names=names, tries=tries)
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
        """Load what this group needs, then unload least recently used entries past the limits — never one it needs, nor
        one whose rows are generating (its adapter or instance is in a running batch)."""
        needed = {s.key: s for s in specs}
        for spec in needed.values():
            if spec.key in self.residency:
                self.residency.touch(spec.key)
            else:
                self._load(spec)
        for key in self.residency.victims({*needed, *self._generating_keys()}):
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
                self._rewrapped()
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

    # -- generation -------------------------------------------------------------------------------
    def _generating_keys(self) -> set[str]:
        """The residency keys of every admitted generation (their adapters and instances must stay loaded)."""
        return {job.adapter for _, job in self.running.values() if job.adapter != BASE}

    def _target(self, job: Job) -> tuple[str, Any, str | None]:
        """``(generator key, model, the row's adapter name)`` of a generation job (its model loaded).

        The base model and mixed LoRA adapters share one batch on the shared base: once it is a PeftModel every row
        names its adapter (``__base__`` for the base model), before that (no adapter loaded yet) no row does. A DoRA
        adapter gets a generator of its own on the shared base (``_step`` makes it the active adapter first); an own
        instance, its own generator."""
        if job.spec == BASE:
            return SHARED, self.model, BASE_ADAPTER if self._peft() else None
        spec: AdapterSpec = job.spec  # type: ignore[assignment]
        self._ensure_loaded([spec])
        if spec.place == MIXED:
            return SHARED, self.model, spec.key
        if spec.place == ALONE:
            return "alone:" + spec.key, self.model, None
        return spec.key, self.residency.entries[spec.key].model, None

    def _peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def _rewrapped(self) -> None:
        """The shared base just became a PeftModel (its first adapter loaded, LoRA layers injected in place): a running
        shared batch now runs through the wrapper, and its rows (all the base model's) name ``__base__`` so the new
        adapter does not apply to them."""
        gen = self.gens.get(SHARED)
        if gen is None:
            return
        gen.model = self.model
        for key, job in self.running.values():
            if key == SHARED and job.request is not None and job.request.adapter is None:
                job.request.adapter = BASE_ADAPTER

    def _admit(self, job: Job) -> None:
        """Add a generation job to its instance's running batch (it joins at the next step)."""
        key, model, adapter = self._target(job)
        gen = self.gens.get(key)
        if gen is None:
            gen = self.gens[key] = BatchGenerator(model, self.pad_id, self.bf16, self.settings.max_batch, tokenizer=self.tok)
        p = job.params
        emit = None
        if job.on_text is not None:
            def emit(text: str, job: Job = job) -> None:
                job.loop.call_soon_threadsafe(job.on_text, text)
        job.request = GenRequest(list(job.prompt), p["max_tokens"], set(p["eos"]), temperature=p.get("temperature") or 0.0,
                                 top_p=p.get("top_p") or 1.0, seed=p.get("seed"), stop_strings=list(p.get("stop") or []),
                                 constraint=p.get("constraint"), adapter=adapter, on_text=emit, cancelled=job.cancelled)
        gen.add(job.request)
        self.running[id(job.request)] = (key, job)
        self.metrics.batch_size.labels("generate").observe(len(gen.rows) + len(gen.waiting))

    def _step_all(self) -> None:
        """One step of every generator with work (a round): rows of cancelled jobs leave, finished rows answer."""
        for _, job in self.running.values():
            if job.cancelled and job.request is not None:
                job.request.cancel()
        start, stepped = self.clock(), False
        for key in list(self.gens):
            gen = self.gens[key]
            if not gen.has_work:
                del self.gens[key]  # an idle generator holds nothing worth keeping (its model stays in the residency)
                continue
            self._step(key, gen)
            stepped = True
        if stepped:
            self._measured_round(self.clock() - start)

    def _step(self, key: str, gen: BatchGenerator) -> None:
        try:
            if key.startswith("alone:"):
                self.model.set_adapter(key.split(":", 1)[1])  # DoRA cannot be named per row: the active adapter
            finished = gen.step()
        except Exception as exc:  # a failing step fails its batch's requests, not the worker
            log.exception("generation step of %s failed", key or "the shared base")
            for rid, (k, job) in list(self.running.items()):
                if k == key:
                    del self.running[rid]
                    job.resolve(error=exc)
            del self.gens[key]
            return
        for f in finished:
            _, job = self.running.pop(id(f.request))
            job.resolve({"ids": f.ids, "text": f.text, "finish_reason": f.finish_reason})

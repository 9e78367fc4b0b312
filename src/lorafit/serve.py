"""`lorafit serve`: trained runs behind an HTTP API (a superset of Hugging Face TEI's for a classifier:
`/predict`, also at `POST /` and `/invocations`, `/tokenize`, `/decode`, `/info`, `/health`, `/metrics`;
the request and answer forms are in tei.py).

Texts from concurrent requests are batched dynamically: a batch runs when it holds `max_batch_size` texts
or its oldest text has waited `max_wait_ms`, whichever comes first, and at once when no other request is
on its way (being read or tokenized), since waiting could then only add latency. Inference runs in one
worker thread fed by the batcher task, never on the event loop, so health, metrics and new requests stay
responsive while a batch computes. Several runs trained on the same base weights share one copy of the
frozen base in memory: each adds only its LoRA and head (unmerged; a batch holds the texts of one run). A
single run, or one whose base nobody shares, is served with LoRA merged into the weights.

    app = lorafit.serve.create_app({"spam": "runs/spam"})   # an ASGI app, for uvicorn or your own service
"""

import asyncio
import copy
import gc
import hmac
import importlib.util
import json
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch

from . import __version__
from .allocator import release_free_memory
from .errors import LorafitError
from .tei import (
    DECODE_SCHEMA,
    PREDICT_SCHEMA,
    TOKENIZE_SCHEMA,
    ApiError,
    parse_decode_request,
    parse_predict_request,
    parse_tokenize_request,
    scores,
    tei_info,
)

PAGE = Path(__file__).parent / "static" / "index.html"
REQUEST_LOGS = ("off", "text", "json")
# TEI's answer headers after `x-` (what a page of another origin may read when CORS allows it)
TIMING_HEADERS = ("total-time", "tokenization-time", "queue-time", "inference-time", "compute-characters",
                  "compute-tokens")  # fmt: skip
# What `pip install 'lorafit[serve]'` adds and the server imports (module names, not package names).
SERVE_MODULES = ("fastapi", "fastapi_offline", "uvicorn", "prometheus_client")


@dataclass
class ServeLimits:
    """Batching, queueing and request limits (the `lorafit serve` options of the same names)."""

    max_batch_size: int = 32  # texts per forward pass
    max_wait_ms: float = 5.0  # how long the oldest waiting text may wait for its batch to fill
    max_queue: int = 1024  # texts waiting at most; beyond it requests get 429
    timeout_s: float = 30.0  # a request waiting longer gets 504 (and shutdown waits this long)
    max_client_batch: int = 256  # texts per request
    max_body_bytes: int = 2_000_000
    api_key: str | None = None  # when set, the model's routes and /info need `Authorization: Bearer KEY`
    # Web pages of these origins (scheme://host[:port], or * for any) may call the API from a browser
    cors_allow_origin: tuple[str, ...] = ()
    log_requests: str = "off"  # one line per request on standard output: off, text or json

    def check(self) -> None:
        """Refuse limits that cannot work, naming the option."""
        for name in ("max_batch_size", "max_queue", "max_client_batch", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise LorafitError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not self.max_wait_ms >= 0:
            raise LorafitError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if not self.timeout_s > 0:
            raise LorafitError(f"--timeout-s must be positive, got {self.timeout_s}")
        if self.log_requests not in REQUEST_LOGS:
            raise LorafitError(
                f"--log-requests must be one of {', '.join(REQUEST_LOGS)}, got {self.log_requests!r}"
            )
        for origin in self.cors_allow_origin:
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path
                                  or parts.query or parts.fragment):  # fmt: skip
                raise LorafitError(f"--cors-allow-origin {origin!r}: an origin is scheme://host[:port] "
                                   "(e.g. http://localhost:3000, no path), or * for any")  # fmt: skip


# --- loading runs ---------------------------------------------------------------------------------------


@dataclass
class ServedRun:
    """One run as the server holds it: its classifier, its config.json, and whether its LoRA is merged or
    its base shared with other runs (what /info reports)."""

    name: str
    run_dir: Path
    classifier: object  # lorafit.run.Classifier
    config: dict
    merged: bool
    shares_base_with: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels

    def encode(self, texts: list[str], truncate: bool, direction: str = "right") -> list[list[int]]:
        """Token ids per text, cut to the run's max length when `truncate` (at the end, or with `direction`
        "left" at the start); else a too long text is a 422."""
        tokenizer, limit = self.classifier.tokenizer, self.classifier.max_length
        rows, _ = tokenizer.encode_batch(texts)
        long = [i for i, row in enumerate(rows) if len(row) > limit]
        if long and not truncate:
            i = long[0]
            raise ApiError(422, "validation", f"inputs[{i}] is {len(rows[i])} tokens long, over the run's "
                           f"max length {limit}; send \"truncate\": true to cut it")  # fmt: skip
        if long:  # re-encode with the tokenizer's own truncation (BERT keeps its final [SEP])
            cut, _ = tokenizer.encode_batch([texts[i] for i in long], limit, direction)
            for i, row in zip(long, cut):
                rows[i] = row
        return [row or [tokenizer.pad_id] for row in rows]  # an empty text still gets one position

    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits of one batch of token rows, in the rows' order (one forward pass: the texts packed into rows
        of the cheapest multiple of 16 tokens in any precision, so the server meets few shapes)."""
        from .train import INFERENCE_WIDTH_MULTIPLE, predict_logits

        c = self.classifier
        return predict_logits(
            c.model,
            rows,
            pad_id=c.tokenizer.pad_id,
            batch_size=len(rows),
            device=c.device,
            precision=c.precision,
            width_multiple=INFERENCE_WIDTH_MULTIPLE,
            streams=1,  # the server's kernels run on its one inference thread (`inference_thread`)
            max_tokens=None,  # the batcher's batch is one forward pass
        )

    def info(self) -> dict:
        model = self.config["model"]
        return {
            "name": self.name,
            "run_dir": str(self.run_dir),
            "model": model["name"],
            "family": model["family"],
            "base_sha256": model.get("sha256"),
            "labels": self.labels,
            "max_length": self.classifier.max_length,
            "pooling": self.config["pooling"],
            "lora": self.config.get("lora"),
            "precision": self.classifier.precision,
            "device": str(self.classifier.device),
            "lora_merged": self.merged,
            "shares_base_with": self.shares_base_with,
            "test_metrics": _test_metrics(self.run_dir),
        }


def _test_metrics(run_dir: Path) -> dict | None:
    """Accuracy and per-class scores of the run's test split (validation when it had none), if recorded."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for split in ("test", "val"):
        m = metrics.get(split)
        if isinstance(m, dict) and m.get("count"):
            keep = ("accuracy", "count", "macro_f1", "weighted_f1", "per_class")
            return {"split": split, **{k: m[k] for k in keep if k in m}}
    return None


def parse_run_specs(specs: list[str]) -> dict[str, str]:
    """`--run NAME=DIR` or `--run DIR` (named after the directory) → {name: dir}; refuses clashes."""
    runs: dict[str, str] = {}
    seen: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = Path(spec.rstrip("/")).name or spec, spec
        if not name or not directory:
            raise LorafitError(f"--run {spec!r}: expected NAME=DIR or DIR")
        if name in runs:
            raise LorafitError(f"--run: the name {name!r} is given twice ({runs[name]} and {directory})")
        real = os.path.realpath(directory)
        if real in seen:
            raise LorafitError(f"--run: {directory} is served twice (as {seen[real]!r} and {name!r})")
        if not (Path(directory) / "config.json").is_file():
            raise LorafitError(f"--run {spec}: {directory} is not a lorafit run directory (no config.json)")
        if not (Path(directory) / "adapter.safetensors").is_file():
            raise LorafitError(f"--run {spec}: {directory} has no adapter.safetensors (did training finish?)")
        runs[name], seen[real] = directory, name
    if not runs:
        raise LorafitError("lorafit serve needs at least one --run DIR")
    return runs


def load_runs(run_dirs: Mapping[str, str | os.PathLike], device: str = "auto", precision: str | None = None):
    """Load every run; runs whose LoRA was trained on the same base weights (same sha256) share one copy of
    the frozen base tensors. Returns {name: ServedRun}."""
    from .run import load_classifier, read_run_config

    configs = {name: read_run_config(d) for name, d in run_dirs.items()}
    groups: dict[str, list[str]] = {}
    for name, config in configs.items():
        # A run that trains base modules in full (PEFT's modules_to_save) keeps its own base.
        lora = config["lora"]
        shareable = lora is not None and not lora.get("modules_to_save") and config["model"].get("sha256")
        groups.setdefault(config["model"]["sha256"] if shareable else f"own:{name}", []).append(name)
    runs = {}
    for names in groups.values():
        if len(names) == 1:
            name = names[0]
            classifier = load_classifier(run_dirs[name], device=device, precision=precision, merge=True)
            runs[name] = ServedRun(name, Path(run_dirs[name]), classifier, configs[name], merged=True)
            continue
        first = load_classifier(run_dirs[names[0]], device=device, precision=precision, merge=False)
        for name in names:
            classifier = first if name == names[0] else _on_shared_base(first, run_dirs[name], configs[name])
            others = [n for n in names if n != name]
            runs[name] = ServedRun(name, Path(run_dirs[name]), classifier, configs[name], False, others)
    return runs


def _on_shared_base(first, run_dir: str | os.PathLike, config: dict):
    """Another run's classifier built on `first`'s frozen tensors: a copy of its modules in which every
    frozen tensor is the same object as in `first` (nothing copied), with this run's LoRA and head."""
    from .classifier import SequenceClassifier, load_adapter
    from .config import LoRAConfig, config_from_dict
    from .devices import cast_for_inference
    from .lora import LoRALinear, apply_lora
    from .run import Classifier

    lora = config_from_dict(LoRAConfig, config["lora"])
    backbone = first.model.backbone
    shared = {id(t): t for t in [*backbone.parameters(), *backbone.buffers()]}
    backbone = copy.deepcopy(backbone, memo=shared)
    for module in list(backbone.modules()):  # take `first`'s LoRA off the copy: the plain base is left
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.base)
    apply_lora(backbone, lora)
    with torch.device(first.device):
        model = SequenceClassifier(backbone, len(config["labels"]), config["pooling"])
    load_adapter(model, Path(run_dir) / "adapter.safetensors")
    model.eval()
    if first.model.bf16_inference:  # this run's adapter in bf16 too; the shared tensors are bf16 already
        cast_for_inference(model)
    return Classifier(
        model, first.tokenizer, config["labels"], config["max_length"], first.device, first.precision
    )


def batch_scores(logits: torch.Tensor) -> list[tuple[list[float], list[float]]]:
    """Per text of a batch, its logits and its softmax probabilities (in float64) as Python lists: computed
    once per batch on the inference thread, so that the event loop only ranks them."""
    return list(zip(logits.tolist(), torch.softmax(logits.double(), dim=-1).tolist()))


# --- dynamic batching -----------------------------------------------------------------------------------


# oneDNN caches the kernels of up to 1,024 shapes × operations by default, and PyTorch's ideep layer above
# it keeps its own cache of as many (LRU_CACHE_CAPACITY), each entry holding memory; a server meets batches
# of ever new shapes. 64 of each cost no measurable time on MiniLM; after 800-1,000 batches of 1-32 SMS
# messages in bf16 they held 100 MiB (oneDNN) and 95 MiB (ideep) less (benchmarks/README.md, "Serving").
PRIMITIVE_CACHE_CAPACITY = 64
IDLE_TRIM_S = 0.1  # idle this long after a batch: hand the heap's free pages back (release_free_memory)
BUSY_TRIM_S = 1.0  # under constant load, trim at most this often (about 2 ms each: 0.2 % of the worker)


@dataclass
class Item:
    """One text waiting for its batch."""

    row: list[int]
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Queues texts per run and runs them in batches in one worker thread.

    A batch runs when `max_batch_size` texts of one run wait, or when its oldest text has waited
    `max_wait_ms`. Texts whose request was cancelled (client gone, timed out) are dropped before their
    batch runs; an exception in a batch fails the requests in it, and the batcher goes on."""

    def __init__(self, runs: dict[str, ServedRun], limits: ServeLimits, metrics,
                 executor: ThreadPoolExecutor | None = None):  # fmt: skip
        self.runs, self.limits, self.metrics = runs, limits, metrics
        self.queues: dict[str, deque[Item]] = {name: deque() for name in runs}
        self.depth = 0  # texts waiting, over all runs
        self.arriving = 0  # requests being read or tokenized: texts that may join the next batch
        self.wakeup = asyncio.Event()
        self.executor = executor or inference_thread()
        # One tokenizing thread: a Hugging Face tokenizer's truncation setting is state that concurrent
        # calls would race on, and tokenizing stays off the event loop.
        self.tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafit-tokenize")
        self.task: asyncio.Task | None = None
        self.untrimmed = False  # batches ran since the heap was last trimmed
        self.trimmed_at = time.perf_counter()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())
        self.task.add_done_callback(self._fail_waiting)

    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)
        self.tokenizer.shutdown(wait=True)

    def submit(self, name: str, rows: list[list[int]]) -> list[asyncio.Future]:
        """Queue a request's texts; 429 (nothing queued) when they do not fit."""
        if self.depth + len(rows) > self.limits.max_queue:
            raise ApiError(429, "overloaded", f"the queue is full ({self.depth} of {self.limits.max_queue} "
                           "texts waiting); retry shortly", headers={"Retry-After": "1"})  # fmt: skip
        loop, now = asyncio.get_running_loop(), time.perf_counter()
        items = [Item(row, loop.create_future(), now) for row in rows]
        self.queues[name].extend(items)
        self.depth += len(items)
        self.metrics.queue_depth.set(self.depth)
        self.wakeup.set()
        return [item.future for item in items]

    async def _loop(self) -> None:
        while True:
            name = await self._next_run()
            batch = await self._collect(name)
            if batch:
                await self._run(name, batch)

    async def _next_run(self) -> str:
        """The run whose oldest waiting text is oldest (waiting for work when there is none)."""
        while True:
            heads = [(queue[0].enqueued, name) for name, queue in self.queues.items() if queue]
            if heads:
                return min(heads)[1]
            self.wakeup.clear()
            if not self.untrimmed:
                await self.wakeup.wait()
                continue
            try:
                await asyncio.wait_for(self.wakeup.wait(), IDLE_TRIM_S)
            except asyncio.TimeoutError:  # idle: trim in the worker thread, so no batch runs meanwhile
                await self._trim()

    async def _trim(self) -> None:
        self.untrimmed, self.trimmed_at = False, time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self.executor, release_free_memory)

    @contextmanager
    def arrival(self):
        """Around reading and tokenizing a request: while any request is on its way, a batch that is not
        full waits for it (up to `max_wait_ms`); with none on its way, waiting could only add latency."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self.wakeup.set()

    async def _collect(self, name: str) -> list[Item]:
        """Wait until the batch is full, its oldest text's wait is up, or no other request is on its way;
        then take it from the queue."""
        queue, size = self.queues[name], self.limits.max_batch_size
        deadline = queue[0].enqueued + self.limits.max_wait_ms / 1000
        while len(queue) < size and self.arriving and (left := deadline - time.perf_counter()) > 0:
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), left)
            except asyncio.TimeoutError:
                break
        batch = []
        while queue and len(batch) < size:
            item = queue.popleft()
            self.depth -= 1
            if not item.future.done():  # done already: cancelled by a client that left or timed out
                batch.append(item)
        self.metrics.queue_depth.set(self.depth)
        return batch

    async def _run(self, name: str, batch: list[Item]) -> None:
        run, start = self.runs[name], time.perf_counter()
        for item in batch:
            self.metrics.queue_seconds.observe(start - item.enqueued)
        self.metrics.batch_size.observe(len(batch))
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda rows: batch_scores(run.logits(rows)), [item.row for item in batch]
            )
        except Exception as e:  # only this batch's requests fail; the worker goes on
            reason = (str(e).splitlines() or [type(e).__name__])[0][:300]
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(ApiError(500, "backend", f"inference failed: {reason}"))
            return
        seconds = time.perf_counter() - start
        self.untrimmed = True
        self.metrics.inference_seconds.labels(name).observe(seconds)
        self.metrics.texts.labels(name).inc(len(batch))
        for item, text_scores in zip(batch, results):
            if not item.future.done():
                item.future.set_result((text_scores, start, seconds))
        if time.perf_counter() - self.trimmed_at >= BUSY_TRIM_S:  # after the answers: they do not wait for it
            await self._trim()

    def _fail_waiting(self, task: asyncio.Task) -> None:
        """The batcher stopped (shutdown, or a bug): nothing queued will run, so fail it now, not at timeout."""
        for queue in self.queues.values():
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(ApiError(503, "unhealthy", "the inference worker has stopped"))
        self.depth = 0


# --- the app --------------------------------------------------------------------------------------------


class Metrics:
    """The Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        seconds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.requests = Counter(
            "lorafit_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "lorafit_request_duration_seconds", "Request latency", ["route"], buckets=seconds, registry=r
        )
        self.queue_seconds = Histogram("lorafit_queue_duration_seconds", "Time a text waited for its batch",
                                       buckets=seconds, registry=r)  # fmt: skip
        self.inference_seconds = Histogram("lorafit_batch_duration_seconds", "Forward pass of one batch", ["run"],
                                           buckets=seconds, registry=r)  # fmt: skip
        self.batch_size = Histogram("lorafit_batch_size", "Texts per batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)  # fmt: skip
        self.queue_depth = Gauge("lorafit_queue_depth", "Texts waiting for a batch", registry=r)
        self.texts = Counter("lorafit_texts_classified", "Texts classified", ["run"], registry=r)


def _route(path: str) -> str:
    """A bounded route label for the metrics (a path with a run name becomes its template)."""
    for route in ("/predict/", "/tokenize/", "/decode/"):
        if path.startswith(route):
            return route + "{name}"
    known = ("/", "/predict", "/invocations", "/tokenize", "/decode", "/health", "/ping", "/info", "/metrics",
             "/docs", "/openapi.json")  # fmt: skip
    return path if path in known else "other"


class MetricsMiddleware:
    """Counts every answer by route and status, and times it (plain ASGI: nothing buffered); with
    `log_requests` text or json, also writes one line per request (`request_log_line`)."""

    def __init__(self, app, metrics: Metrics, log_requests: str = "off", log=print):
        self.app, self.metrics, self.log_requests, self.log = app, metrics, log_requests, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route, seconds = _route(scope["path"]), time.perf_counter() - start
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if self.log_requests != "off":
                self.log(request_log_line(scope, status[0], seconds, self.log_requests), flush=True)


def request_log_line(scope, status: int, seconds: float, form: str) -> str:
    """One request's log line: UTC time, client, method, path, status, milliseconds, and what the route
    noted in the request's state (`lorafit_log`: run, texts, tokens; or the error's sentence)."""
    from datetime import datetime, timezone

    when = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    client = scope.get("client") or ("-", 0)
    record = {"time": when, "client": client[0], "method": scope["method"], "path": scope["path"],
              "status": status, "ms": round(seconds * 1000, 2), **scope.get("state", {}).get("lorafit_log", {})}  # fmt: skip
    if form == "json":
        return json.dumps(record, ensure_ascii=False)
    extra = " ".join(f"{k}={json.dumps(v, ensure_ascii=False) if isinstance(v, str) else v}"
                     for k, v in list(record.items())[6:])  # fmt: skip
    head = (
        f"{record['time']} {record['client']} {record['method']} {record['path']} {status} {record['ms']} ms"
    )
    return f"{head} {extra}".rstrip()


def _error_response(e: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"error": e.message, "error_type": e.error_type}, status_code=e.status, headers=e.headers
    )


async def _read_body(request, limit: int) -> bytes:
    """The body, refusing (413) one larger than `limit` before reading it when its length is declared."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, "payload_too_large", f"the request body is over this server's limit of "
                         f"{limit:,} bytes (--max-body-bytes)")  # fmt: skip
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(
            499, "cancelled", "the client closed the connection before sending the whole body"
        ) from None
    return b"".join(chunks)


def _authorize(request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send the header "
                       "\"Authorization: Bearer KEY\"", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


async def _wait_for(request, futures: list[asyncio.Future], timeout: float):
    """The futures' results, or ApiError 504 after `timeout`; a client that disconnects cancels them (its
    texts are then dropped before their batch runs)."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    results = asyncio.ensure_future(asyncio.gather(*futures))
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({results, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if results in done:
        return results.result()
    for future in futures:
        future.cancel()  # their texts are dropped when their batch is formed
    results.cancel()
    results.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning in the log
    if watcher in done:
        raise ApiError(499, "cancelled", "the client closed the connection")
    raise ApiError(504, "timeout", f"the request waited more than {timeout:g} s (--timeout-s)")


@dataclass
class ServerState:
    """What the routes share: the runs (once loaded), the batcher, the limits, the metrics."""

    limits: ServeLimits
    metrics: Metrics
    runs: dict[str, ServedRun] = field(default_factory=dict)
    batcher: Batcher | None = None
    ready: bool = False
    failure: str | None = None  # why loading failed, for /health

    async def load(self, runs: Mapping, device: str, precision: str | None, on_ready) -> None:
        """Load the runs that are directories, warm every run up, start the batcher: all of it on the one
        inference thread, off the event loop."""
        executor, loop = inference_thread(), asyncio.get_running_loop()
        try:
            loaded = dict(runs)
            if not all(isinstance(r, ServedRun) for r in loaded.values()):
                loaded = await loop.run_in_executor(executor, load_runs, runs, device, precision)
            await loop.run_in_executor(executor, warm_up, loaded, self.limits.max_batch_size)
        except Exception as e:  # a bad run: report it on /health rather than die silently
            self.failure = (str(e).splitlines() or [type(e).__name__])[0]
            executor.shutdown(wait=False)
            return
        # What loading made lives as long as the server: frozen, the garbage collector's full collections
        # skip it (unfrozen, each took up to 123 ms under load, stalling the event loop and the batch).
        gc.collect()
        gc.freeze()
        self.runs = loaded
        self.batcher = Batcher(loaded, self.limits, self.metrics, executor)
        self.batcher.start()
        self.ready = True
        if on_ready:
            on_ready(self)

    def require_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "unhealthy", self.failure or "the model is still loading; retry shortly")

    def run_named(self, name: str | None, route: str = "/predict") -> ServedRun:
        """The run a call names (None: the only one); 404 naming the runs otherwise."""
        self.require_ready()
        names = ", ".join(self.runs)
        if name is None:
            if len(self.runs) == 1:
                return next(iter(self.runs.values()))
            raise ApiError(
                404, "not_found", f"this server has several runs: POST {route}/NAME (runs: {names})"
            )
        if name not in self.runs:
            raise ApiError(404, "not_found", f"no run named {name!r} (runs: {names})")
        return self.runs[name]

    async def predict(self, request, name: str | None):
        """One /predict call: check, tokenize (off the loop), queue, wait, answer with TEI's timing headers."""
        from fastapi.responses import JSONResponse

        start, limits = time.perf_counter(), self.limits
        _authorize(request, limits.api_key)
        run = self.run_named(name)
        with self.batcher.arrival():
            body = await _read_body(request, limits.max_body_bytes)
            parsed = parse_predict_request(body, limits.max_client_batch)
            loop, tokenizing = asyncio.get_running_loop(), time.perf_counter()
            rows = await loop.run_in_executor(
                self.batcher.tokenizer, run.encode, parsed.texts, parsed.truncate, parsed.direction
            )
        queued = time.perf_counter()
        noted = {"run": run.name, "texts": len(rows), "tokens": sum(len(row) for row in rows)}
        request.scope.setdefault("state", {}).setdefault("lorafit_log", {}).update(noted)
        results = await _wait_for(request, self.batcher.submit(run.name, rows), limits.timeout_s)
        # A request's texts may span batches: its inference time is that of each distinct batch, once.
        inference = sum({(begin, seconds): seconds for _, begin, seconds in results}.values())
        answer = [scores(values, run.labels, parsed.function, parsed.top_k) for values, _, _ in results]
        now = time.perf_counter()
        headers = {"x-total-time": f"{(now - start) * 1000:.2f}",
                   "x-tokenization-time": f"{(queued - tokenizing) * 1000:.2f}",
                   "x-queue-time": f"{max(now - queued - inference, 0) * 1000:.2f}",
                   "x-inference-time": f"{inference * 1000:.2f}",
                   "x-compute-characters": str(sum(len(text) for text in parsed.texts)),
                   "x-compute-tokens": str(noted["tokens"])}  # fmt: skip
        return JSONResponse(answer[0] if parsed.single else answer, headers=headers)

    async def tokenize(self, request, name: str | None) -> list[list[dict]]:
        """One /tokenize call: each text's tokens with their character offsets (TEI's answer: one list per
        text), on the tokenizer thread."""
        _authorize(request, self.limits.api_key)
        run = self.run_named(name, "/tokenize")
        body = await _read_body(request, self.limits.max_body_bytes)
        texts, special = parse_tokenize_request(body, self.limits.max_client_batch)
        tokenizer = run.classifier.tokenizer
        return await asyncio.get_running_loop().run_in_executor(
            self.batcher.tokenizer, lambda: [tokenizer.tokens(text, special) for text in texts]
        )

    async def decode(self, request, name: str | None) -> list[str]:
        """One /decode call: the text of each list of token ids."""
        _authorize(request, self.limits.api_key)
        run = self.run_named(name, "/decode")
        body = await _read_body(request, self.limits.max_body_bytes)
        tokenizer = run.classifier.tokenizer
        batch, skip = parse_decode_request(body, self.limits.max_client_batch, tokenizer.vocab_size)
        return await asyncio.get_running_loop().run_in_executor(
            self.batcher.tokenizer, lambda: [tokenizer.decode(ids, skip) for ids in batch]
        )


def inference_thread() -> ThreadPoolExecutor:
    """The one thread that runs the server's model work: loading, warm-up and every batch.

    With PyTorch's OpenMP backend every thread that runs a parallel kernel gets a team of worker threads
    of its own, kept while that thread lives. Two teams on the cores make libgomp stop spinning between
    kernels, and then each forward pass takes 1.5-2x as long (one MiniLM text: 16-25 ms instead of 8-11
    on 2 cores, benchmarks/README.md). So the server never runs kernels on a second long-lived thread."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafit-inference")


def on_passing_thread(fn, *args):
    """`fn(*args)` on a thread that ends when it returns, taking its OpenMP team with it (see
    `inference_thread`); its exceptions are raised here."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafit-load") as pool:
        return pool.submit(fn, *args).result()


def warm_up(runs: dict[str, ServedRun], max_batch_size: int) -> None:
    """One batch of one text and one full batch per run, so the first requests do not pay for the
    kernels' first-call setup."""
    for run in runs.values():
        for n in sorted({1, max_batch_size}):
            run.logits(run.encode(["Warming up the classifier before the first request."] * n, truncate=True))


def require_serve_extra() -> None:
    """Fail in one sentence, before any run is loaded, when the `serve` extra is not installed (a plain
    `pip install lorafit` leaves it out), instead of a traceback from the first import that needs it."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise LorafitError(
            f"serving needs the serve extra, which is not installed (missing: {', '.join(missing)}): "
            "pip install 'lorafit[serve]' (or, in a clone, pip install -e '.[serve]')"
        )


def create_app(runs: Mapping[str, str | os.PathLike | ServedRun], *, limits: ServeLimits | None = None,
               device: str = "auto", precision: str | None = None, on_ready=None):  # fmt: skip
    """The ASGI (FastAPI) app serving `runs` ({name: run directory, or a ServedRun from `load_runs`}).

    Run directories are loaded (and every run warmed up) on the inference thread at startup; until that is
    done /health and /predict answer 503. Then the process's live objects are frozen out of the garbage
    collector's full collections (`gc.freeze`). `on_ready(state)` is called once it is ready."""
    require_serve_extra()
    from fastapi_offline import FastAPIOffline  # FastAPI with its /docs assets on disk: works offline
    from starlette.exceptions import HTTPException

    limits = limits or ServeLimits()
    limits.check()
    state = ServerState(limits, Metrics())

    @asynccontextmanager
    async def lifespan(app):
        loading = asyncio.ensure_future(state.load(runs, device, precision, on_ready))
        yield
        loading.cancel()
        if state.batcher:
            await state.batcher.stop()

    app = FastAPIOffline(title="lorafit", version=__version__, lifespan=lifespan,
                         description="Text classification with LoRA fine-tuned transformers "
                                     "(Hugging Face TEI's /predict, and more).")  # fmt: skip
    app.state.lorafit = state

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        request.scope.setdefault("state", {}).setdefault("lorafit_log", {})["error"] = e.message
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        routing = e.status_code in (404, 405)
        message = f"no route {request.method} {request.url.path}" if routing else str(e.detail)
        return _error_response(ApiError(e.status_code, kind, message))

    _add_routes(app, state)
    if limits.cors_allow_origin:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(limits.cors_allow_origin),
                           allow_methods=["GET", "POST"], allow_headers=["content-type", "authorization"],
                           expose_headers=[f"x-{name}" for name in TIMING_HEADERS])  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, log_requests=limits.log_requests)
    return app


def _add_routes(app, state: ServerState) -> None:
    """TEI's routes for a classifier: /predict (also `POST /` and SageMaker's `/invocations`), /tokenize and
    /decode for the only run, each also as `/ROUTE/NAME` for the run NAME; then the service routes."""
    from fastapi import Request

    def body(schema: dict) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    def only_run(handler):
        async def route(request: Request):
            return await handler(request, None)

        return route

    def named_run(handler):
        async def route(request: Request, name: str):
            return await handler(request, name)

        return route

    model_routes = (("predict", state.predict, PREDICT_SCHEMA, "Classify texts"),
                    ("tokenize", state.tokenize, TOKENIZE_SCHEMA, "Tokens with character offsets"),
                    ("decode", state.decode, DECODE_SCHEMA, "Token ids to text"))  # fmt: skip
    for route, handler, schema, summary in model_routes:
        app.add_api_route(f"/{route}", only_run(handler), methods=["POST"], openapi_extra=body(schema),
                          summary=f"{summary} (the only run)", operation_id=route)  # fmt: skip
        app.add_api_route(f"/{route}/{{name}}", named_run(handler), methods=["POST"], openapi_extra=body(schema),
                          summary=f"{summary} with the run NAME", operation_id=f"{route}_run")  # fmt: skip
    for path in ("/", "/invocations"):  # TEI's route for a classifier, and SageMaker's
        app.add_api_route(path, only_run(state.predict), methods=["POST"], openapi_extra=body(PREDICT_SCHEMA),
                          summary="Classify texts (the only run): the same as /predict",
                          operation_id=f"predict{path.replace('/', '_')}")  # fmt: skip
    _add_service_routes(app, state)


def _add_service_routes(app, state: ServerState) -> None:
    """/health (and SageMaker's /ping), /info, /metrics and the page."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    limits = state.limits

    async def health():
        if state.ready and state.batcher.alive():
            return {"status": "ok"}
        reason = state.failure or ("the inference worker has stopped" if state.ready else "loading")
        answer = {"status": "unavailable", "error": reason, "error_type": "unhealthy"}
        return JSONResponse(answer, status_code=503)

    summary = "200 when every run is loaded and the worker is alive, else 503"
    app.add_api_route("/health", health, methods=["GET"], summary=summary)
    app.add_api_route("/ping", health, methods=["GET"], summary="The same as /health (SageMaker's route)")

    @app.get("/info", summary="The runs served, with their models, labels and limits (and TEI's fields)")
    async def info(request: Request):
        _authorize(request, limits.api_key)
        state.require_ready()
        shown = (
            "max_batch_size",
            "max_wait_ms",
            "max_queue",
            "timeout_s",
            "max_client_batch",
            "max_body_bytes",
        )
        runs = list(state.runs.values())
        tei = tei_info(runs[0], limits, __version__) if len(runs) == 1 else {}
        return {**tei, "lorafit_version": __version__, "auth": limits.api_key is not None,
                "runs": [run.info() for run in runs],
                "limits": {k: getattr(limits, k) for k in shown}}  # fmt: skip

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


# --- the command ----------------------------------------------------------------------------------------


def _listen(host: str, port: int):
    """A socket bound to host:port (before the model loads, so a busy port fails at once)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say
    # so, and with it on every keep-alive answer waited 40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LorafitError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def start_line(run: ServedRun, address: str) -> str:
    """The line `lorafit serve` prints for each run once it is ready."""
    lora = (
        "LoRA merged" if run.merged else f"LoRA unmerged, base shared with {', '.join(run.shares_base_with)}"
    )
    return (f"lorafit serve: {run.name} ({run.config['model']['name']}, labels {', '.join(run.labels)}; "
            f"{run.classifier.device}, {run.classifier.precision}, {lora}) ready at {address}")  # fmt: skip


def serve(run_dirs: Mapping[str, str], limits: ServeLimits, *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", precision: str | None = None, log=print) -> None:  # fmt: skip
    """`lorafit serve`: load the runs, then answer HTTP on host:port until SIGTERM or Ctrl-C, which stop
    accepting, finish the requests in flight (for up to `limits.timeout_s`) and return."""
    import signal

    require_serve_extra()
    import uvicorn

    from .devices import cap_kernel_cache

    limits.check()
    sock = _listen(host, port)
    # Read by oneDNN when it makes its first kernel, so before loading; the user's own value wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE_CAPACITY))
    cap_kernel_cache()  # ideep's (LRU_CACHE_CAPACITY, 64 as well), read at first use
    # Loaded here, so a bad run fails the command; on a passing thread, as the main thread must not keep
    # an OpenMP team of its own (inference_thread says why).
    runs = on_passing_thread(load_runs, run_dirs, device, precision)
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{sock.getsockname()[1]}"

    def ready(state: ServerState) -> None:
        for run in state.runs.values():
            log(start_line(run, address), flush=True)

    app = create_app(runs, limits=limits, on_ready=ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(limits.timeout_s))  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with these handlers
    # in place that is a no-op, so a requested stop exits 0.
    handlers = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    log("lorafit serve: stopped", flush=True)

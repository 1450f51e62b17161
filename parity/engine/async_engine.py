"""AsyncEngine: many asyncio callers share one Engine, driven by a background thread.

The loop is a dedicated thread, not an asyncio task with the step in an executor, because:
  - every Engine call (add_request, step, abort, update_weights, sleep, wake_up) must happen on one
    thread; with an executor that holds only by convention, here it holds by construction: the
    thread owns the engine and callers only hand it commands;
  - the thread steps back to back while requests run, with no event-loop round trip per step, so a
    busy event loop (HTTP parsing, SSE writes) never delays the GPU and a long step never blocks
    the event loop;
  - callers may come from any event loop (or several), since results travel back through
    `loop.call_soon_threadsafe` / `asyncio.wrap_future`.

That thread is `EngineLoop`; where its outputs go is a `Replies`: here, asyncio futures and stream queues
in this process; for `parity serve`, a pipe to the HTTP process (parity.server.engine_process), since an
HTTP event loop in the engine's process competes with its step for the one GIL.

Commands run between two steps, in arrival order, so `update_weights` is applied at a step boundary.
A request's bad input raises to its own caller from `Engine.add_request`, which validates before
queueing anything; an exception inside a step fails the requests then in flight (their callers get
`RequestFailedError`), they are aborted so their KV blocks are freed, and the loop keeps serving.
Each step's outputs are handed over in one batch (`Replies.flush`), so a consumer wakes once per step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from parity.engine.engine import Engine, Prompt
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Logprob, Rollout, Sequence
from parity.engine.sleep import SleepStats, WakeStats
from parity.engine.weight_sync import WeightSource, WeightSyncStats
from parity.models.weights import iter_safetensors

T = TypeVar("T")
logger = logging.getLogger(__name__)


class EngineShutdownError(RuntimeError):
    """The AsyncEngine was shut down; it takes no more requests."""


class RequestFailedError(RuntimeError):
    """A step failed while this request was in flight; the request was aborted and the engine keeps serving."""


@dataclass
class RolloutDelta:
    """What one sample produced since its last delta. The sample's last delta has `finish_reason`
    ("stop", "length" or "abort") and the whole `rollout`. `top_logprobs` when SamplingParams.logprobs is set."""

    request_id: str
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    weight_versions: list[int]  # the weight version that sampled each token
    top_logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    rollout: Rollout | None = None


STREAM_END = object()  # a stream's closing item


def new_request_id(request_id: str | None, continue_from: Rollout | None) -> str:
    """The caller's id (checked to be a str), the continued rollout's, or a fresh one."""
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
    if request_id is None:
        return continue_from.request_id if continue_from is not None else uuid.uuid4().hex
    return request_id


async def read_stream(q: asyncio.Queue) -> AsyncIterator[RolloutDelta]:
    """A stream's deltas from its queue until STREAM_END (or an exception, raised here). What piled up
    while the reader was busy is joined into one delta per sample, so a busy reader handles fewer, larger
    deltas."""
    while True:
        items = [await q.get()]
        while not q.empty():
            items.append(q.get_nowait())
        pending: dict[int, RolloutDelta] = {}
        end = None
        for item in items:
            if item is STREAM_END or isinstance(item, BaseException):
                end = item
                break
            before = pending.get(item.sample_index)
            pending[item.sample_index] = item if before is None else _join(before, item)
        for delta in pending.values():
            yield delta
        if isinstance(end, BaseException):
            raise end
        if end is STREAM_END:
            return


def _join(a: RolloutDelta, b: RolloutDelta) -> RolloutDelta:
    """Two consecutive deltas of one sample as one."""
    top = None if a.top_logprobs is None else a.top_logprobs + b.top_logprobs
    return RolloutDelta(a.request_id, a.sample_index, a.token_ids + b.token_ids, a.logprobs + b.logprobs,
                        a.weight_versions + b.weight_versions, top, b.finish_reason, b.rollout)


class Replies(Protocol):
    """Where the engine thread's outputs go. `to` is what the request was submitted with (its caller's
    handle). Called on the engine thread only; `flush` after each step and each batch of commands."""

    def result(self, to: object, rollouts: list[Rollout]) -> None: ...  # all samples done, by sample index
    def error(self, to: object, error: Exception) -> None: ...
    def delta(self, to: object, delta: RolloutDelta) -> None: ...  # streams only
    def flush(self) -> None: ...


@dataclass
class _Request:
    """Engine-thread bookkeeping of one request."""

    request_id: str
    num_samples: int
    to: object  # the caller's handle, passed back to Replies
    stream: bool
    samples: list[Sequence] = field(default_factory=list)  # streams only: the live sequences
    sent: list[int] = field(default_factory=list)  # streams only: tokens already delivered per sample
    closed: set[int] = field(default_factory=set)  # streams only: samples whose last delta is out
    finished: dict[int, Rollout] = field(default_factory=dict)


class EngineLoop:
    """The thread that owns an Engine: runs posted commands between steps, steps back to back while
    requests run, and hands what they produce to `replies`. `submit` and `post` may be called from any
    thread; `abort` and `abort_all` only from commands (the engine thread)."""

    def __init__(self, engine: Engine, replies: Replies):
        self.engine = engine
        self._replies = replies
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}  # touched by the engine thread only
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="parity-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt: Prompt | None, params: SamplingParams, request_id: str, continue_from: Rollout | None,
               to: object, stream: bool) -> None:
        self.post(lambda: self._add(prompt, params, request_id, continue_from, to, stream))

    def post(self, command: Callable[[], None]) -> None:
        with self._lock:  # nothing is queued behind the shutdown marker
            if self._closed:
                raise EngineShutdownError("the engine is shut down")
            self._commands.put(command)

    def abort_soon(self, request_id: str) -> None:
        """A caller left (cancelled, or stopped reading its stream): abort its request, if still serving."""
        with self._lock:
            if not self._closed:
                self._commands.put(lambda: self.abort(request_id))

    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Abort what is in flight (callers get their partial samples), stop the thread and let go of
        the engine. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._commands.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the engine thread did not stop within {timeout} s (a step still running?)")
        self.engine = None

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def abort(self, request_id: str, sample_index: int | None = None) -> list[Rollout]:
        if request_id not in self._requests:
            return []
        partial = self.engine.abort(request_id, sample_index)
        for rollout in partial:
            self._record(rollout)
        return partial

    def abort_all(self) -> list[Rollout]:
        partial = []
        for request_id in list(self._requests):
            partial += self.abort(request_id)
        return partial

    # ------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        if self.engine.device.type == "cuda":  # the current device is per thread; kernels launch on it
            torch.cuda.set_device(self.engine.device)
        while True:
            commands = [] if self.engine.has_unfinished() else [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is None:
                    self._guarded(self.abort_all)
                    self._guarded(self._replies.flush)
                    return
                self._guarded(command)
            self._guarded(self._replies.flush)
            if self.engine.has_unfinished():
                self._guarded(self._step)
                self._guarded(self._replies.flush)

    @staticmethod
    def _guarded(fn: Callable[[], object]) -> None:
        """Commands report their own errors to their callers; anything else is logged, never fatal to the loop."""
        try:
            fn()
        except Exception:
            logger.exception("EngineLoop: unexpected error on the engine thread")

    def _add(self, prompt: Prompt | None, params: SamplingParams, request_id: str, continue_from: Rollout | None,
             to: object, stream: bool) -> None:
        try:
            self.engine.add_request(prompt, params, request_id=request_id, continue_from=continue_from)
        except Exception as e:  # bad input, or an id in flight: this caller alone hears of it
            self._replies.error(to, e)
            return
        req = _Request(request_id, params.n, to, stream)
        if stream:
            req.samples = sorted(_queued_samples(self.engine, request_id), key=lambda s: s.sample_index)
            req.sent = [len(seq.output_ids) for seq in req.samples]
        self._requests[request_id] = req

    def _step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as e:
            self._fail_all(e)
            return
        for rollout in finished:
            self._record(rollout)
        for req in list(self._requests.values()):
            if req.stream:
                self._send_deltas(req)

    def _record(self, rollout: Rollout) -> None:
        req = self._requests.get(rollout.request_id)
        if req is None:
            return
        if rollout.finish_reason == "error":  # its step failed: the whole request fails, its other samples stop
            del self._requests[req.request_id]
            self.engine.abort(req.request_id)
            self._replies.error(req.to, RequestFailedError(f"request {req.request_id}: {rollout.error}"))
            return
        req.finished[rollout.sample_index] = rollout
        if req.stream:
            self._send_deltas(req)
        if len(req.finished) == req.num_samples:  # a stream's Rollouts went out in its closing deltas already
            del self._requests[req.request_id]
            self._replies.result(req.to, [] if req.stream else [req.finished[k] for k in sorted(req.finished)])

    def _send_deltas(self, req: _Request) -> None:
        for k, seq in enumerate(req.samples):
            done = req.finished.get(seq.sample_index)
            start = req.sent[k]
            if seq.sample_index in req.closed or (done is None and start == len(seq.output_ids)):
                continue
            req.sent[k] = len(seq.output_ids)
            if done is not None:
                req.closed.add(seq.sample_index)
            top = seq.top_logprobs[start:] if seq.params.logprobs is not None else None
            self._replies.delta(req.to, RolloutDelta(
                req.request_id, seq.sample_index, seq.output_ids[start:], seq.output_logprobs[start:],
                seq.output_weight_versions[start:], top, done and done.finish_reason, done))

    def _fail_all(self, cause: Exception) -> None:
        """step() itself raised (it reports model failures as "error" rollouts, so this is a bug): fail and
        abort everything in flight rather than leave callers waiting."""
        logger.exception("EngineLoop: engine step raised")
        requests = list(self._requests.values())
        self._requests.clear()
        self.engine.abort_all()
        for req in requests:
            error = RequestFailedError(f"request {req.request_id}: engine step raised {type(cause).__name__}: {cause}")
            error.__cause__ = cause
            self._replies.error(req.to, error)


@dataclass
class _Caller:
    """An in-process caller: the future its `generate` awaits, and for a stream its event loop and queue."""

    result: concurrent.futures.Future
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None


def _resolve(fut: concurrent.futures.Future, value: object = None, error: BaseException | None = None) -> None:
    """Set a result unless the caller already gave up on it (cancelled)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class _LocalReplies:
    """Replies to callers in this process: futures resolve at once; stream items are handed to each event
    loop in one `call_soon_threadsafe` per step."""

    def __init__(self):
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

    def result(self, to: _Caller, rollouts: list[Rollout]) -> None:
        _resolve(to.result, rollouts)
        self._emit(to, STREAM_END)

    def error(self, to: _Caller, error: Exception) -> None:
        _resolve(to.result, error=error)
        self._emit(to, error)

    def delta(self, to: _Caller, delta: RolloutDelta) -> None:
        self._emit(to, delta)

    def _emit(self, to: _Caller, item: object) -> None:
        if to.queue is not None:
            self._outbox.setdefault(to.loop, []).append((to.queue, item))

    def flush(self) -> None:
        for loop, items in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that caller's loop is closed: nobody is listening any more
                pass
        self._outbox = {}


class AsyncEngine:
    """`await generate(...)`, `async for delta in stream(...)`, `await abort(...)`, `await update_weights(...)`,
    `await sleep(...)`, `await wake_up(...)` from any number of coroutines; `shutdown()` when done.

    The wrapped engine belongs to the background thread from construction on: do not call it directly.
    Its immutable attributes (tokenizer, model_config, max_model_len) may be read.
    """

    def __init__(self, engine: Engine):
        self._loop = EngineLoop(engine, _LocalReplies())

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> AsyncEngine:
        """`Engine.from_pretrained(path, **kwargs)` wrapped in an AsyncEngine."""
        return cls(Engine.from_pretrained(path, **kwargs))

    @property
    def engine(self) -> Engine | None:
        """The wrapped engine (None after shutdown); read its immutable attributes only."""
        return self._loop.engine

    @property
    def tokenizer(self):
        return self._loop.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._loop.engine.max_model_len

    # ------------------------------------------------------------------------------- caller side
    async def generate(
        self, prompt: Prompt | None, params: SamplingParams | None = None, request_id: str | None = None,
        continue_from: Rollout | None = None,
    ) -> list[Rollout]:
        """The request's `params.n` samples, sorted by sample index. Aborted samples come back partial,
        with finish_reason "abort". Cancelling the awaiting task aborts the request. `continue_from` carries
        an aborted sample on (see `Engine.add_request`; prompt None: the rollout's, request id: the rollout's)."""
        request_id = new_request_id(request_id, continue_from)
        caller = _Caller(concurrent.futures.Future())
        self._loop.submit(prompt, params or SamplingParams(), request_id, continue_from, caller, stream=False)
        try:
            return await asyncio.wrap_future(caller.result)
        except asyncio.CancelledError:
            self._loop.abort_soon(request_id)
            raise

    async def stream(
        self, prompt: Prompt | None, params: SamplingParams | None = None, request_id: str | None = None,
        continue_from: Rollout | None = None,
    ) -> AsyncIterator[RolloutDelta]:
        """Deltas of every sample of the request as steps produce them; ends when all samples have
        finished (or were aborted). A reader that falls behind gets the steps it missed joined into one
        delta per sample (see `read_stream`). Leaving the loop early aborts the request. A continuation's
        deltas start after the tokens it carries."""
        request_id = new_request_id(request_id, continue_from)
        caller = _Caller(concurrent.futures.Future(), asyncio.get_running_loop(), asyncio.Queue())
        self._loop.submit(prompt, params or SamplingParams(), request_id, continue_from, caller, stream=True)
        try:
            async for delta in read_stream(caller.queue):
                yield delta
        finally:
            if not caller.result.done():
                self._loop.abort_soon(request_id)

    async def abort(self, request_id: str, sample_index: int | None = None) -> list[Rollout]:
        """Stop the request's unfinished samples (one, with `sample_index`) now and return them (tokens so
        far, finish_reason "abort"); once all its samples are over, its `generate` returns and its stream
        ends. An unknown or finished id returns []."""
        return await self.call(lambda engine: self._loop.abort(request_id, sample_index))

    async def abort_all(self) -> list[Rollout]:
        """Abort every request in flight; return the partial samples."""
        return await self.call(lambda engine: self._loop.abort_all())

    async def update_weights(self, source: WeightSource, partial: bool = False, in_flight: str | None = None
                             ) -> WeightSyncStats:
        """`Engine.update_weights` at the next step boundary. With requests running, `in_flight` "keep" or
        "recompute" says what happens to them (None refuses the update while any run)."""
        return await self.call(lambda engine: engine.update_weights(source, partial=partial, in_flight=in_flight))

    async def update_weights_from_files(self, files: list[Path], partial: bool = False, in_flight: str | None = None
                                        ) -> WeightSyncStats:
        """`update_weights` from safetensors files (HF names), read off the engine thread."""
        tensors = await asyncio.to_thread(lambda: dict(iter_safetensors(files)))
        return await self.update_weights(tensors, partial=partial, in_flight=in_flight)

    async def sleep(self, level: int = 1) -> SleepStats:
        return await self.call(lambda engine: engine.sleep(level))

    async def wake_up(self, tags: list[str] | None = None) -> WakeStats:
        return await self.call(lambda engine: engine.wake_up(tags))

    async def weight_version(self) -> int:
        return await self.call(lambda engine: engine.weight_version)

    async def is_sleeping(self) -> bool:
        return await self.call(lambda engine: engine.sleep_state is not None)

    async def has_unfinished(self) -> bool:
        """Whether any request is queued or running."""
        return await self.call(lambda engine: engine.has_unfinished())

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine thread at the next step boundary and return its result
        (or raise its exception here). For anything else a caller needs from the engine."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def command() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    _resolve(fut, fn(self._loop.engine))
                except Exception as e:
                    _resolve(fut, error=e)

        self._loop.post(command)
        return await asyncio.wrap_future(fut)

    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Abort what is in flight (callers get their partial samples), stop the thread and let go of
        the engine, so its memory can be freed. Idempotent."""
        self._loop.shutdown(timeout)

    @property
    def is_running(self) -> bool:
        return self._loop.is_running


def _queued_samples(engine: Engine, request_id: str) -> list[Sequence]:
    """The sequences `add_request` just queued for `request_id`; a stream reads their new tokens after each step."""
    return [s for s in engine.scheduler.waiting if s.request_id == request_id]

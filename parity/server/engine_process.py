"""The engine in a process of its own, for `parity serve`; the HTTP server talks to it over a pipe.

Why a process: with the HTTP event loop and the engine thread in one process, they share one GIL. Every
torch call releases the GIL and must take it back; while the event loop is busy (parsing requests,
writing JSON or one SSE event per sample per step) the engine thread waits for it, up to the interpreter's
switch interval each time, so the steps stretch and the accelerator idles. vLLM splits its server the
same way (an engine-core process behind the API server). Here the engine process runs the same
`EngineLoop` as the in-process `AsyncEngine`; its main thread only reads commands from the pipe.

The pipe is a socket pair from `multiprocessing` carrying pickled tuples (prompts as token ids, the
SamplingParams, and back the finished `Rollout`s and, for streams, `RolloutDelta`s): no extra dependency,
and pickle of lists of ints is fast. The engine process sends one message per step with everything the
step produced, so the HTTP process wakes once per step, not once per token or request. Control calls
(abort, weights from a checkpoint, sleep, wake_up, weight version) are named messages, answered at the
next step boundary; checkpoint files are read in the engine process, off its engine thread.

`EngineProcess` is the HTTP side: the same async methods as `AsyncEngine` that the server uses. It binds to
the first event loop that calls it. If the engine process dies, every waiting caller gets
`EngineShutdownError` and `is_running` turns False; if the HTTP process dies, the engine process sees the
pipe close and exits.
"""

from __future__ import annotations

import asyncio
import faulthandler
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.engine.async_engine import (
    STREAM_END,
    EngineLoop,
    EngineShutdownError,
    RolloutDelta,
    new_request_id,
    read_stream,
)
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout
from parity.engine.sleep import SleepStats, WakeStats
from parity.engine.weight_sync import WeightSyncStats

logger = logging.getLogger(__name__)
PIPE_BUFFER_BYTES = 8 << 20  # a step's outputs for hundreds of requests fit without blocking the engine
STARTUP_PROGRESS_S = 30.0  # how often the HTTP process logs that it still waits for the engine process


@dataclass
class EngineStartup:
    """Where the engine process's start-up time went, measured in that process (seconds)."""

    imports_s: float  # spawn to the engine's code running: a fresh interpreter importing torch and parity
    load_s: float  # Engine.from_pretrained: weights, KV cache, kernels, CUDA graphs


@dataclass
class EngineInfo:
    """What the HTTP process needs from the engine before serving."""

    tokenizer: Any
    max_model_len: int
    startup: EngineStartup


def _portable(error: BaseException) -> Exception:
    """`error` if it survives pickling, else a builtin of its kind with its message (the status maps the same)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        kind = next((k for k in (ValueError, TypeError, RuntimeError) if isinstance(error, k)), RuntimeError)
        return kind(f"{type(error).__name__}: {error}")


def _send(conn, lock: threading.Lock, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        conn.send_bytes(data)


def _widen(conn) -> None:
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BUFFER_BYTES)
    finally:
        sock.detach()


def _exit_status(process: multiprocessing.process.BaseProcess) -> str:
    """How a process ended, in words: its exit code, the signal that killed it, or that it still runs."""
    code = process.exitcode
    if code is None:
        return f"(pid {process.pid}) closed its pipe but is still running"
    if code < 0:
        try:
            return f"(pid {process.pid}) was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"(pid {process.pid}) was killed by signal {-code}"
    return f"(pid {process.pid}) exited with code {code}"


# ----------------------------------------------------------------------------------- engine process
class _PipeReplies:
    """The engine loop's outputs, collected per step and sent as one message: a list of
    ("result", request_id, rollouts), ("error", request_id, error), ("delta", request_id, *its fields),
    ("reply", call_id, error or None, value). A writer thread does the sending, so a full pipe (the HTTP
    process busy) holds up that thread, never the engine's steps."""

    def __init__(self, conn, lock: threading.Lock):
        self._conn, self._lock = conn, lock
        self._outbox: list[tuple] = []
        self._pending: queue.SimpleQueue = queue.SimpleQueue()  # pickled messages; None: stop
        self._writer = threading.Thread(target=self._write, name="parity-engine-writer", daemon=True)
        self._writer.start()

    def result(self, to: str, rollouts: list[Rollout]) -> None:
        self._outbox.append(("result", to, rollouts))

    def error(self, to: str, error: Exception) -> None:
        self._outbox.append(("error", to, _portable(error)))

    def delta(self, to: str, delta: RolloutDelta) -> None:
        # its fields as a tuple: pickled and unpickled 3-4x faster than the dataclass (hundreds per step)
        self._outbox.append(("delta", to, delta.sample_index, delta.token_ids, delta.logprobs, delta.weight_versions,
                             delta.top_logprobs, delta.finish_reason, delta.rollout))

    def reply(self, call_id: int, fn: Callable[[], object]) -> None:
        try:
            self._outbox.append(("reply", call_id, None, fn()))
        except Exception as e:  # the call's own failure, for its caller alone
            self.fail(call_id, e)

    def fail(self, call_id: int, error: Exception) -> None:
        self._outbox.append(("reply", call_id, _portable(error), None))

    def flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._pending.put(pickle.dumps(outbox, protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        """Send what is queued (the loop's last flush included), then stop the writer."""
        self._pending.put(None)
        self._writer.join()

    def _write(self) -> None:
        while (data := self._pending.get()) is not None:
            try:
                with self._lock:
                    self._conn.send_bytes(data)
            except OSError:  # the HTTP process is gone; the reader sees the pipe close and shuts down
                return


def _calls(loop: EngineLoop) -> dict[str, Callable[..., object]]:
    """The control calls the HTTP process may make, run on the engine thread."""
    return {
        "abort": loop.abort,
        "abort_all": loop.abort_all,
        "sleep": lambda level: loop.engine.sleep(level),
        "wake_up": lambda tags: loop.engine.wake_up(tags),
        "weight_version": lambda: loop.engine.weight_version,
        "is_sleeping": lambda: loop.engine.sleep_state is not None,
        "has_unfinished": lambda: loop.engine.has_unfinished(),
    }


def _load_then_update(loop: EngineLoop, replies: _PipeReplies, call_id: int, files: list[Path], partial: bool,
                      in_flight: str | None) -> None:
    """Read checkpoint files on this thread, then apply them on the engine thread at a step boundary."""
    from parity.models.weights import iter_safetensors

    try:
        tensors = dict(iter_safetensors(files))
    except Exception as e:
        error = _portable(e)
        loop.post(lambda: replies.fail(call_id, error))
        return
    loop.post(lambda: replies.reply(
        call_id, lambda: loop.engine.update_weights(tensors, partial=partial, in_flight=in_flight)))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (as logging's last-resort handler does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr(log_level: int | str, role: str) -> None:
    """parity's log records on stderr at `log_level`, each naming `role` and the pid, and every thread's stack
    on SIGUSR1: what a server log needs to show where time went, for both of `parity serve`'s processes.
    Calling it again replaces the handler it added."""
    parity_logger = logging.getLogger("parity")
    for old in [h for h in parity_logger.handlers if isinstance(h, _StderrHandler)]:
        parity_logger.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{role} pid %(process)d] %(message)s"))
    parity_logger.addHandler(handler)
    parity_logger.setLevel(log_level.upper() if isinstance(log_level, str) else log_level)
    # the process's own stderr: sys.stderr may be a capture with no file descriptor
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def _engine_main(conn, model: str, options: dict, num_threads: int, spawned_at: float,
                 log_level: int = logging.WARNING) -> None:
    """The engine process: load the model, report ready with its start-up times (or the failure), then hand
    commands to the loop. `spawned_at`: the parent's time.time() at spawn (this module's imports, torch's
    among them, ran before this function could)."""
    for stream in (sys.stdout, sys.stderr):  # unbuffered: a process killed at a time limit loses no lines
        stream.reconfigure(line_buffering=True)
    log_to_stderr(log_level, "parity-engine")
    import torch

    from parity.engine.engine import Engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the HTTP process, which shuts this one down
    torch.set_num_threads(num_threads)
    lock = threading.Lock()
    imports_s = time.time() - spawned_at
    logger.info("imports took %.1f s since spawn; loading %s with %s", imports_s, model, options)
    loading = time.perf_counter()
    try:
        engine = Engine.from_pretrained(model, **options)
    except BaseException as e:
        logger.exception("loading %s failed after %.1f s", model, time.perf_counter() - loading)
        _send(conn, lock, ("failed", _portable(e)))
        return
    startup = EngineStartup(imports_s, time.perf_counter() - loading)
    _send(conn, lock, ("ready", EngineInfo(engine.tokenizer, engine.max_model_len, startup)))
    replies = _PipeReplies(conn, lock)
    loop = EngineLoop(engine, replies)
    calls = _calls(loop)
    del engine
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the HTTP process is gone
            break
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params, continue_from, stream = message
            loop.submit(prompt, params, request_id, continue_from, request_id, stream)
        elif kind == "abort_soon":
            loop.abort_soon(message[1])
        elif kind == "call":
            _, call_id, name, args = message
            if name == "update_weights_from_files":
                threading.Thread(target=_load_then_update, args=(loop, replies, call_id, *args), daemon=True).start()
            else:
                fn = calls[name]
                loop.post(lambda call_id=call_id, fn=fn, args=args: replies.reply(call_id, lambda: fn(*args)))
        elif kind == "shutdown":
            break
    loop.shutdown(None)  # aborts what is in flight; its partial results go out in the last flush
    replies.close()
    conn.close()


# ----------------------------------------------------------------------------------- HTTP process
def _end(waiter: asyncio.Future | asyncio.Queue, result: object = None, error: Exception | None = None) -> None:
    """End a caller's wait: a stream's queue gets STREAM_END or the error, a future its result or the error
    (unless it is done: a cancelled caller)."""
    if isinstance(waiter, asyncio.Queue):
        waiter.put_nowait(STREAM_END if error is None else error)
    elif not waiter.done():
        waiter.set_result(result) if error is None else waiter.set_exception(error)


class EngineProcess:
    """`Engine.from_pretrained(model, **options)` in a spawned process, with AsyncEngine's async API:
    generate, stream, abort, abort_all, update_weights_from_files, sleep, wake_up, weight_version,
    is_sleeping, has_unfinished, shutdown. The constructor returns once the model is loaded (or raises its error,
    or TimeoutError after `startup_timeout` seconds); meanwhile it logs every STARTUP_PROGRESS_S that it waits."""

    def __init__(self, model: str, startup_timeout: float = 1800.0, **options):
        import torch

        if not startup_timeout > 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout!r}")
        start = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
        self._conn, child = ctx.Pipe(duplex=True)
        _widen(self._conn)
        _widen(child)
        self._process = ctx.Process(target=_engine_main, name="parity-engine", daemon=True, args=(
            child, str(model), options, torch.get_num_threads(), time.time(),
            logging.getLogger("parity").getEffectiveLevel()))
        self._process.start()
        child.close()
        logger.info("started the engine process (pid %d) to load %s", self._process.pid, model)
        kind, payload = self._wait_ready(model, start, startup_timeout)
        if kind == "failed":
            self._process.join()
            raise payload
        self.info: EngineInfo = payload
        self.startup_s = time.perf_counter() - start  # spawn to ready, as the HTTP process waited for it
        logger.info("the engine process (pid %d) is ready after %.1f s (imports %.1f s, Engine.from_pretrained %.1f s)",
                    self.pid, self.startup_s, payload.startup.imports_s, payload.startup.load_s)
        self._send_lock = threading.Lock()
        self._waiting: dict[str, asyncio.Future | asyncio.Queue] = {}  # request id -> its caller
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._lost: str | None = None  # why the engine process is gone

    def _wait_ready(self, model: str, start: float, timeout: float) -> tuple[str, object]:
        """The engine process's first message, ("ready", EngineInfo) or ("failed", error); kills it and raises
        TimeoutError after `timeout` s, RuntimeError if it dies first."""
        while not self._conn.poll(min(STARTUP_PROGRESS_S, max(0.0, start + timeout - time.perf_counter()))):
            waited = time.perf_counter() - start
            if waited >= timeout:
                self._process.kill()
                self._process.join(10)
                raise TimeoutError(f"the engine process (pid {self._process.pid}) did not load {model} within "
                                   f"startup_timeout={timeout} s; killed it (its output above shows how far it got)")
            logger.info("still waiting for the engine process (pid %d) to load %s: %.0f s so far",
                        self._process.pid, model, waited)
        try:
            return pickle.loads(self._conn.recv_bytes())
        except EOFError:
            self._process.join(10)
            raise RuntimeError(f"the engine process {_exit_status(self._process)} while loading {model}, "
                               f"after {time.perf_counter() - start:.1f} s") from None

    @property
    def tokenizer(self):
        return self.info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        """The engine process's exit code; None while it runs."""
        return self._process.exitcode

    @property
    def is_running(self) -> bool:
        return not self._closed and self._lost is None and self._process.is_alive()

    # ------------------------------------------------------------------------------- requests
    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       continue_from: Rollout | None = None) -> list[Rollout]:
        """As `AsyncEngine.generate`: the samples sorted by index; cancelling aborts the request."""
        request_id = self._new(request_id, continue_from)
        fut = self._loop.create_future()
        self._request(request_id, fut, prompt, params, continue_from, stream=False)
        try:
            return await fut
        except asyncio.CancelledError:
            self._abort_soon(request_id)
            raise

    async def stream(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     continue_from: Rollout | None = None) -> AsyncIterator[RolloutDelta]:
        """As `AsyncEngine.stream`: deltas per step (joined when the reader lags); leaving early aborts."""
        request_id = self._new(request_id, continue_from)
        q: asyncio.Queue = asyncio.Queue()
        self._request(request_id, q, prompt, params, continue_from, stream=True)
        try:
            async for delta in read_stream(q):
                yield delta
        finally:
            if request_id in self._waiting:  # the reader left before the request ended (its result or error)
                self._abort_soon(request_id)

    def _new(self, request_id: str | None, continue_from: Rollout | None) -> str:
        self._bind()
        request_id = new_request_id(request_id, continue_from)
        if request_id in self._waiting:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a new id or abort() it first")
        return request_id

    def _request(self, request_id: str, waiter, prompt, params, continue_from, stream: bool) -> None:
        self._send(("add", request_id, prompt, params or SamplingParams(), continue_from, stream))
        self._waiting[request_id] = waiter

    def _abort_soon(self, request_id: str) -> None:
        if self.is_running:
            try:
                self._send(("abort_soon", request_id))
            except EngineShutdownError:
                pass

    # ------------------------------------------------------------------------------- control
    async def abort(self, request_id: str, sample_index: int | None = None) -> list[Rollout]:
        return await self._call("abort", request_id, sample_index)

    async def abort_all(self) -> list[Rollout]:
        return await self._call("abort_all")

    async def update_weights_from_files(self, files: list[Path], partial: bool = False, in_flight: str | None = None
                                        ) -> WeightSyncStats:
        return await self._call("update_weights_from_files", list(files), partial, in_flight)

    async def sleep(self, level: int = 1) -> SleepStats:
        return await self._call("sleep", level)

    async def wake_up(self, tags: list[str] | None = None) -> WakeStats:
        return await self._call("wake_up", tags)

    async def weight_version(self) -> int:
        return await self._call("weight_version")

    async def is_sleeping(self) -> bool:
        return await self._call("is_sleeping")

    async def has_unfinished(self) -> bool:
        return await self._call("has_unfinished")

    async def _call(self, name: str, *args):
        self._bind()
        call_id = next(self._call_ids)
        fut = self._loop.create_future()
        self._send(("call", call_id, name, args))
        self._calls[call_id] = fut
        return await fut

    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Abort what is in flight and stop the engine process, which frees its memory. Idempotent; any thread."""
        if not self._closed:
            try:
                self._send(("shutdown",))
            except EngineShutdownError:  # the pipe is gone: the process cannot be asked, only stopped
                self._process.kill()
            self._closed = True
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            raise TimeoutError(f"the engine process did not stop within {timeout} s; killed it")

    # ------------------------------------------------------------------------------- the pipe
    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            threading.Thread(target=self._read, name="parity-pipe-reader", daemon=True).start()
        elif loop is not self._loop:
            raise RuntimeError("EngineProcess serves one event loop; it is bound to another")
        if not self.is_running:
            raise EngineShutdownError(self._lost or "the engine process is shut down")

    def _send(self, message: tuple) -> None:
        if self._closed or self._lost is not None:
            raise EngineShutdownError(self._lost or "the engine process is shut down")
        try:
            _send(self._conn, self._send_lock, message)
        except OSError as e:
            raise EngineShutdownError(f"the engine process is gone ({e})") from e

    def _read(self) -> None:
        """The reader thread: blocking reads of whole messages (each one engine step's outputs), handed to the
        event loop. Not the loop's add_reader: uvloop (uvicorn's choice when installed) makes a watched fd
        non-blocking, and a message that had only partly arrived then read as a closed pipe."""
        while True:
            try:
                message = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                break
            if not self._to_loop(self._deliver, message):
                return
        self._to_loop(self._gone)

    def _to_loop(self, fn: Callable, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the event loop is closed: no one is left to tell
            return False

    def _deliver(self, message: list[tuple]) -> None:
        for event in message:
            self._dispatch(event)

    def _dispatch(self, event: tuple) -> None:
        kind, key = event[0], event[1]
        if kind == "reply":
            fut = self._calls.pop(key, None)
            if fut is not None:
                _end(fut, event[3], event[2])
            return
        waiter = self._waiting.get(key)
        if waiter is None:
            return
        if kind == "delta":
            _, _, sample_index, token_ids, logprobs, versions, top, finish_reason, rollout = event
            waiter.put_nowait(RolloutDelta(key, sample_index, token_ids, logprobs, versions, top, finish_reason, rollout))
            return
        del self._waiting[key]  # "result" or "error": the request is over
        _end(waiter, event[2] if kind == "result" else None, event[2] if kind == "error" else None)

    def _gone(self) -> None:
        """The pipe closed: the engine process stopped. Fail whoever still waits."""
        self._process.join(5)
        self._lost = "the engine process was shut down" if self._closed else f"the engine process {_exit_status(self._process)}"
        error = EngineShutdownError(self._lost)
        for waiter in [*self._waiting.values(), *self._calls.values()]:
            _end(waiter, error=error)
        self._waiting.clear()
        self._calls.clear()
        if not self._closed:
            logger.error("EngineProcess: %s", self._lost)

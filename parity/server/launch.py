"""Running the app: `serve` blocks (the CLI); `ServerThread` runs uvicorn in a background thread (tests,
examples, benchmarks) on an ephemeral port."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine

import uvicorn
from fastapi import FastAPI

from parity.engine.async_engine import AsyncEngine
from parity.server.app import create_app
from parity.server.engine_process import EngineProcess

DEFAULT_HOST = "127.0.0.1"  # local only unless asked: the control routes can replace the weights


def build_app(model: str, served_model_name: str | None = None, api_key: str | None = None,
              engine_process: bool = True, **engine_options) -> FastAPI:
    """Load `model` (directory, .gguf or alias) and wrap it in the API: in an engine process of its own
    (`EngineProcess`, the default: the HTTP work never holds the engine's GIL), or with `engine_process=False`
    in this process on an `AsyncEngine` thread."""
    if engine_process:
        engine = EngineProcess(model, **engine_options)
    else:
        engine = AsyncEngine.from_pretrained(model, **engine_options)
    return create_app(engine, served_model_name or str(model), api_key)


def serve(app: FastAPI, host: str = DEFAULT_HOST, port: int = 8000, log_level: str = "info",
          access_log: bool = True) -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)


class ServerThread:
    """uvicorn serving `app` from a daemon thread. `start()` returns once the socket listens; `stop()` shuts
    the server down, which (the app's lifespan) shuts the engine down too."""

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
        self.app = app
        self.host = host
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="parity-http", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._server.serve()

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.host} within {timeout} s")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self, coro: Coroutine, timeout: float = 60.0):
        """Run `coro` on the server's event loop and return its result: the engine's async API is the
        app's, bound to that loop (e.g. `server.run(engine.has_unfinished())`)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the HTTP server did not stop within {timeout} s")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

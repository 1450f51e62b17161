"""The OpenAI-compatible HTTP API on an AsyncEngine or an EngineProcess (FastAPI).

Routes: /v1/completions, /v1/chat/completions (SSE streaming with `stream: true`), /v1/models, /health,
/tokenize, and the RL control routes a trainer in another process calls: /update_weights (from a
checkpoint directory), /sleep, /wake_up, /abort, /weight_version. With an API key every route checks
`Authorization: Bearer <key>`.

Prompts are tokenized here, on the event loop, with the server's own copy of the tokenizer (the engine
thread keeps the engine's), so tokenization stays off the engine's critical path and no tokenizer is
shared between threads. Responses carry vLLM's `prompt_token_ids` / `token_ids` when `return_token_ids`
is set, and usage reports prompt tokens served by the prefix cache (`prompt_tokens_details.cached_tokens`).
Completion bodies go out as `JSONResponse` (plain json.dumps), not through FastAPI's jsonable_encoder,
which walks every token id of a response in Python. Errors use OpenAI's body, `{"error": {"message",
"type", "param", "code"}}`: bad input is 400 naming the field, a wrong key 401, an unknown model 404, an
asleep or shut-down engine 503, a failed step 500.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers.decoders import DecodeStream

from parity.engine.async_engine import AsyncEngine, EngineShutdownError, RequestFailedError, RolloutDelta
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout
from parity.engine.sleep import EngineAsleepError
from parity.models.weights import safetensors_files
from parity.server.engine_process import EngineProcess
from parity.server.protocol import (
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    SleepRequest,
    TokenizeRequest,
    UpdateWeightsRequest,
    WakeUpRequest,
    _SamplingRequest,
)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


def _error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param, "code": status}}


def _status_of(exc: Exception) -> int:
    if isinstance(exc, (EngineAsleepError, EngineShutdownError)):
        return 503
    if isinstance(exc, RequestFailedError):
        return 500
    if isinstance(exc, (ValueError, TypeError)):  # bad input: prompt too long, token ids, weights, params
        return 400
    if isinstance(exc, RuntimeError):  # the engine's state refuses it now (e.g. sleep with requests running)
        return 409
    return 500


@dataclass
class _Prompt:
    """One engine request of an API call: its id and token ids."""

    request_id: str
    token_ids: list[int]


class _TextStream:
    """A choice's text as tokens arrive: each token decoded against a short window (`tokenizers`' DecodeStream),
    holding back what could still turn out to be the start of a stop string (the engine cuts the final text)."""

    def __init__(self, tokenizer, params: SamplingParams):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._text = ""
        self._sent = 0

    def add(self, token_ids: list[int]) -> str:
        for t in token_ids:
            self._text += self._stream.step(self._backend, t) or ""
        return self._release(len(self._text) - self._holdback)

    def finish(self, final_text: str | None) -> str:
        if final_text is not None:
            self._text = final_text
        return self._release(len(self._text))

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        out = self._text[self._sent : upto]
        self._sent = upto
        return out


class OpenAIServer:
    """The routes' shared state: the engine, the served name, the tokenizer copy, and the ids in flight."""

    def __init__(self, engine: AsyncEngine | EngineProcess, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.max_model_len = engine.max_model_len
        self.created = int(time.time())
        self.in_flight: dict[str, list[str]] = {}  # API request id -> engine request ids

    # ------------------------------------------------------------------------------- helpers
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}", "model")

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return list(prompt)

    def render_chat(self, messages, tools, add_generation_prompt: bool, template_kwargs: dict | None) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        text = self.tokenizer.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in messages], tools=tools, tokenize=False,
            add_generation_prompt=add_generation_prompt, **(template_kwargs or {}),
        )
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template has its special tokens

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def engine_prompts(self, base_id: str, prompts: list[list[int]]) -> list[_Prompt]:
        if base_id in self.in_flight:
            raise APIError(400, f"request_id {base_id!r} is already in flight", "request_id")
        ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
        return [_Prompt(rid, p) for rid, p in zip(ids, prompts)]

    async def generate_all(self, base_id: str, prompts: list[_Prompt], params: SamplingParams) -> list[list[Rollout]]:
        """Every prompt's samples; if one fails the others are cancelled (which aborts them)."""
        self.in_flight[base_id] = [p.request_id for p in prompts]
        if len(prompts) == 1:
            try:
                return [await self.engine.generate(prompts[0].token_ids, params, request_id=prompts[0].request_id)]
            finally:
                del self.in_flight[base_id]
        tasks = [asyncio.ensure_future(self.engine.generate(p.token_ids, params, request_id=p.request_id))
                 for p in prompts]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            del self.in_flight[base_id]

    async def stream_all(self, base_id: str, prompts: list[_Prompt], params: SamplingParams
                         ) -> AsyncIterator[tuple[int, RolloutDelta]]:
        """Every prompt's deltas, interleaved as they come, tagged with the prompt's index."""
        self.in_flight[base_id] = [p.request_id for p in prompts]
        if len(prompts) == 1:  # the common case: no task and queue per delta in between
            try:
                async for delta in self.engine.stream(prompts[0].token_ids, params, request_id=prompts[0].request_id):
                    yield 0, delta
            finally:
                del self.in_flight[base_id]
            return
        merged: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, prompt: _Prompt) -> None:
            try:
                async for delta in self.engine.stream(prompt.token_ids, params, request_id=prompt.request_id):
                    await merged.put((i, delta))
                await merged.put(done)
            except Exception as e:
                await merged.put(e)

        tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await merged.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            del self.in_flight[base_id]

    def usage(self, groups: list[list[Rollout]]) -> dict:
        prompt_tokens = sum(len(g[0].prompt_ids) for g in groups)
        completion = sum(len(r.output_ids) for g in groups for r in g)
        cached = sum(g[0].num_cached_prompt_tokens for g in groups)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ------------------------------------------------------------------------------- logprobs
    def completion_logprobs(self, token_ids: list[int], logprobs: list[float], top, offset: int) -> dict:
        """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens = [self.token_text(t) for t in token_ids]
        offsets, at = [], offset
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        tops = None
        if top is not None:
            tops = [{self.token_text(t): _json_logprob(lp.logprob) for t, lp in sorted(d.items(), key=lambda kv: kv[1].rank)}
                    for d in top]
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, token_ids: list[int], logprobs: list[float], top) -> dict:
        def entry(t: int, lp: float) -> dict:
            text = self.token_text(t)
            return {"token": text, "logprob": _json_logprob(lp), "bytes": list(text.encode())}

        content = []
        for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
            item = entry(t, lp)
            ranked = sorted(top[i].items(), key=lambda kv: kv[1].rank) if top is not None else []
            item["top_logprobs"] = [entry(k, v.logprob) for k, v in ranked]
            content.append(item)
        return {"content": content}

    def prompt_logprobs(self, rollout: Rollout) -> list | None:
        if rollout.prompt_logprobs is None:
            return None
        return [None if d is None else {str(t): {"logprob": _json_logprob(lp.logprob), "rank": lp.rank,
                                                 "decoded_token": self.token_text(t)} for t, lp in d.items()}
                for d in rollout.prompt_logprobs]

    def token_ids_fields(self, req: _SamplingRequest, rollout: Rollout, chat: bool) -> dict:
        out = {}
        if req.return_token_ids:
            out["token_ids"] = rollout.output_ids
            out["weight_versions"] = rollout.output_weight_versions
            if not chat:
                out["prompt_token_ids"] = rollout.prompt_ids
        if req.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs(rollout)
        return out


def _json_logprob(value: float) -> float:
    """JSON has no infinities: a token the filters removed (logprob -inf) is sent as -9999.0, as vLLM does."""
    return value if math.isfinite(value) else -9999.0


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem, as `field: message`; union alternatives collapse into one line."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(x) for x in first["loc"] if x != "body"]
    field = loc[0] if loc else None
    shown = [e for e in errors if [str(x) for x in e["loc"] if x != "body"][:1] == loc[:1]]
    message = "; ".join(dict.fromkeys(e["msg"] for e in shown))
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    return f"{'.'.join(loc) if loc else 'body'}: {message}", field


def create_app(engine: AsyncEngine | EngineProcess, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. The app owns the engine: when it shuts down
    (uvicorn stops), the engine is shut down and released."""
    server = OpenAIServer(engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown)
        server.engine = None

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")

    app = FastAPI(title="parity", lifespan=lifespan, dependencies=[Depends(check_key)],
                  docs_url=None, redoc_url=None, openapi_url=None)  # no route without the key check
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(_error_body(exc.status, exc.message, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        return JSONResponse(_error_body(400, message, field), status_code=400)

    async def engine_error(request: Request, exc: Exception):
        status = _status_of(exc)
        return JSONResponse(_error_body(status, f"{type(exc).__name__}: {exc}"), status_code=status)

    for kind in (ValueError, TypeError, RuntimeError):  # what the engine raises for a request or a command
        app.add_exception_handler(kind, engine_error)

    # ------------------------------------------------------------------------------- info
    @app.get("/health")
    async def health():
        if server.engine is None or not server.engine.is_running:
            raise APIError(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "parity", "max_model_len": server.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'")
        if req.messages is not None:
            tokens = server.render_chat(req.messages, req.tools, req.add_generation_prompt, None)
        else:
            tokens = server.encode(req.prompt, req.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.max_model_len}

    # ------------------------------------------------------------------------------- generation
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        server.check_model(req.model)
        if req.best_of not in (None, req.n):
            raise APIError(400, f"best_of: only best_of == n is supported, got best_of={req.best_of}, n={req.n}", "best_of")
        params = _params(req, req.max_tokens, req.logprobs or None)
        base_id = req.request_id or f"cmpl-{uuid.uuid4().hex}"
        prompts = server.engine_prompts(base_id, [server.encode(p) for p in _prompts(req)])
        if req.stream:
            deltas = await _started(server.stream_all(base_id, prompts, params))
            return _sse(_completion_chunks(server, req, base_id, prompts, params, deltas))
        groups = await server.generate_all(base_id, prompts, params)
        choices = []
        for g in groups:
            for r in g:
                choice = {"index": len(choices), "text": r.text, "finish_reason": r.finish_reason, "stop_reason": r.stop_reason,
                          "logprobs": None}
                if req.logprobs is not None:
                    choice["logprobs"] = server.completion_logprobs(r.output_ids, r.output_logprobs, r.top_logprobs, 0)
                choice.update(server.token_ids_fields(req, r, chat=False))
                choices.append(choice)
        return JSONResponse({"id": base_id, "object": "text_completion", "created": int(time.time()),
                             "model": model_name, "choices": choices, "usage": server.usage(groups)})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        server.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
        prompt = server.render_chat(req.messages, req.tools, req.add_generation_prompt, req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(server.max_model_len - len(prompt), 1)
        params = _params(req, max_tokens, req.top_logprobs or None)
        base_id = req.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        prompts = server.engine_prompts(base_id, [prompt])
        if req.stream:
            deltas = await _started(server.stream_all(base_id, prompts, params))
            return _sse(_chat_chunks(server, req, base_id, params, deltas))
        (group,) = await server.generate_all(base_id, prompts, params)
        choices = []
        for r in group:
            choice = {"index": r.sample_index, "message": {"role": "assistant", "content": r.text},
                      "finish_reason": r.finish_reason, "stop_reason": r.stop_reason, "logprobs": None}
            if req.logprobs:
                choice["logprobs"] = server.chat_logprobs(r.output_ids, r.output_logprobs, r.top_logprobs)
            choice.update(server.token_ids_fields(req, r, chat=True))
            choices.append(choice)
        body = {"id": base_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": server.usage([group])}
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt
        return JSONResponse(body)

    # ------------------------------------------------------------------------------- RL control
    @app.post("/update_weights")
    async def update_weights(req: UpdateWeightsRequest):
        path = Path(req.path)
        files = safetensors_files(path) if path.is_dir() else []
        if not files:
            raise APIError(400, f"path: {req.path!r} is not a directory with .safetensors files", "path")
        stats = await server.engine.update_weights_from_files(files, partial=req.partial, in_flight=req.in_flight)
        return {"weight_version": stats.weight_version, "num_tensors": stats.num_tensors, "seconds": stats.seconds}

    @app.get("/weight_version")
    async def weight_version():
        return {"weight_version": await server.engine.weight_version()}

    @app.post("/sleep")
    async def sleep(req: SleepRequest):
        stats = await server.engine.sleep(req.level)
        return {"level": stats.level, "freed_bytes": stats.freed_bytes}

    @app.post("/wake_up")
    async def wake_up(req: WakeUpRequest):
        stats = await server.engine.wake_up(req.tags)
        return {"tags": list(stats.tags), "restored_bytes": stats.restored_bytes}

    @app.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": await server.engine.is_sleeping()}

    @app.post("/abort")
    async def abort(req: AbortRequest):
        if req.request_id is None:
            aborted = await server.engine.abort_all()
        else:
            aborted = []
            for rid in server.in_flight.get(req.request_id, [req.request_id]):
                aborted += await server.engine.abort(rid)
        return {"num_aborted": len(aborted), "request_ids": sorted({r.request_id for r in aborted})}

    return app


def _prompts(req: CompletionRequest) -> list[str | list[int]]:
    try:
        return req.prompts()
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from e


def _params(req: _SamplingRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise APIError(400, str(e)) from e


async def _started(deltas: AsyncIterator) -> AsyncIterator:
    """Wait for a stream's first delta before the response starts, so the request's own errors (a prompt over
    the context, an asleep engine) still become an HTTP status; later ones are reported inside the stream."""
    try:
        first = await deltas.__anext__()
    except BaseException:
        await deltas.aclose()
        raise

    async def chained():
        yield first
        async for delta in deltas:
            yield delta

    return chained()


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def events():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _completion_chunks(server: OpenAIServer, req: CompletionRequest, base_id: str, prompts: list[_Prompt],
                             params: SamplingParams, deltas: AsyncIterator) -> AsyncIterator[dict]:
    created = int(time.time())
    texts: dict[int, _TextStream] = {}
    offsets: dict[int, int] = {}
    finished: dict[int, list[Rollout]] = {}
    try:
        async for i, delta in deltas:
            index = i * params.n + delta.sample_index
            first = index not in texts
            text = texts.setdefault(index, _TextStream(server.tokenizer, params))
            piece = text.add(delta.token_ids)
            if delta.rollout is not None:
                piece += text.finish(delta.rollout.text)
                finished.setdefault(i, []).append(delta.rollout)
            choice = {"index": index, "text": piece, "finish_reason": delta.finish_reason, "logprobs": None}
            if req.logprobs is not None:
                choice["logprobs"] = server.completion_logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs,
                                                                offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in choice["logprobs"]["tokens"])
            if delta.rollout is not None:
                choice["stop_reason"] = delta.rollout.stop_reason
            if req.return_token_ids:
                choice["token_ids"] = delta.token_ids
                choice["weight_versions"] = delta.weight_versions
                if first:
                    choice["prompt_token_ids"] = prompts[i].token_ids
            yield {"id": base_id, "object": "text_completion", "created": created, "model": server.model_name,
                   "choices": [choice]}
    except Exception as e:  # the status line is sent: report in the stream, as vLLM does
        yield _error_body(_status_of(e), f"{type(e).__name__}: {e}")
        return
    if req.stream_options and req.stream_options.include_usage:
        yield {"id": base_id, "object": "text_completion", "created": created, "model": server.model_name,
               "choices": [], "usage": server.usage([finished[i] for i in sorted(finished)])}


async def _chat_chunks(server: OpenAIServer, req: ChatCompletionRequest, base_id: str, params: SamplingParams,
                       deltas: AsyncIterator) -> AsyncIterator[dict]:
    created = int(time.time())
    head = {"id": base_id, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
    texts: dict[int, _TextStream] = {}
    finished: list[Rollout] = []
    try:
        for k in range(params.n):
            first = {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield {**head, "choices": [first]}
        async for _, delta in deltas:
            k = delta.sample_index
            text = texts.setdefault(k, _TextStream(server.tokenizer, params))
            piece = text.add(delta.token_ids)
            if delta.rollout is not None:
                piece += text.finish(delta.rollout.text)
                finished.append(delta.rollout)
            choice = {"index": k, "delta": {"content": piece}, "finish_reason": delta.finish_reason, "logprobs": None}
            if req.logprobs:
                choice["logprobs"] = server.chat_logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs)
            if req.return_token_ids:
                choice["token_ids"] = delta.token_ids
                choice["weight_versions"] = delta.weight_versions
            if delta.rollout is not None:
                choice["stop_reason"] = delta.rollout.stop_reason
            yield {**head, "choices": [choice]}
    except Exception as e:
        yield _error_body(_status_of(e), f"{type(e).__name__}: {e}")
        return
    if req.stream_options and req.stream_options.include_usage:
        yield {**head, "choices": [], "usage": server.usage([sorted(finished, key=lambda r: r.sample_index)])}

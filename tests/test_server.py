"""`parity serve` under the real openai client: completions, chat, streaming, concurrency, errors, RL control."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import os
import signal
import sys
import time
import weakref
from pathlib import Path

import httpx
import pytest

# The server's packages and the client come with the dev extra; the GPU machine's image has neither.
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from transformers import AutoTokenizer  # noqa: E402

from parity import Engine, SamplingParams  # noqa: E402
from parity.engine.async_engine import AsyncEngine  # noqa: E402
from parity.server.app import create_app  # noqa: E402
from parity.server.launch import ServerThread, build_app  # noqa: E402
from parity.testing.factory import TinyModelSpec, write_tiny_model  # noqa: E402

OPTIONS = dict(dtype="fp32", device="cpu", deterministic=True, block_size=4, max_model_len=512)
KEY = "test-key"
MODEL = "tiny"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def offline(llama_dir) -> Engine:
    return Engine.from_pretrained(llama_dir, **OPTIONS)


@pytest.fixture(scope="module", params=["engine process", "engine thread"])
def server(request, llama_dir):
    """Every API test runs against both layouts: `parity serve`'s engine process and the in-process AsyncEngine."""
    if request.param == "engine process":
        app = build_app(llama_dir, MODEL, api_key=KEY, **OPTIONS)
    else:
        app = create_app(AsyncEngine(Engine.from_pretrained(llama_dir, **OPTIONS)), MODEL, api_key=KEY)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_completion_equals_offline_generate(client, offline):
    prompt = "The quick brown fox"
    params = SamplingParams(n=2, max_tokens=8, seed=3, temperature=0.9, top_k=50)
    want = offline.generate([prompt], params)
    r = client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=8, seed=3, temperature=0.9, logprobs=0,
                                  extra_body={"top_k": 50, "return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1]
    for choice, rollout in zip(r.choices, want):
        assert choice.prompt_token_ids == offline.tokenizer.encode(prompt) == rollout.prompt_ids
        assert choice.token_ids == rollout.output_ids
        assert choice.logprobs.token_logprobs == rollout.output_logprobs
        assert choice.text == rollout.text and choice.finish_reason == rollout.finish_reason
        assert choice.logprobs.tokens == [offline.tokenizer.decode([t]) for t in rollout.output_ids]
    assert r.usage.prompt_tokens == len(want[0].prompt_ids)
    assert r.usage.completion_tokens == sum(len(x.output_ids) for x in want)


def test_vllm_sampling_extras_map_onto_sampling_params(client, offline):
    prompt = "What is 12 + 34?"
    extras = dict(stop=[" answ", "zzz"], min_tokens=2, repetition_penalty=1.3, logit_bias={7: 2.5, 9: -1.0},
                  prompt_logprobs=2, presence_penalty=0.5, top_k=40, min_p=0.01)
    params = SamplingParams(max_tokens=20, seed=17, logprobs=2, **extras)
    (want,) = offline.generate([prompt], params)
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, seed=17, logprobs=2, stop=extras["stop"],
        presence_penalty=0.5, logit_bias={"7": 2.5, "9": -1.0},
        extra_body={"min_tokens": 2, "repetition_penalty": 1.3, "prompt_logprobs": 2, "top_k": 40, "min_p": 0.01,
                    "return_token_ids": True})
    (choice,) = r.choices
    assert (choice.token_ids, choice.text, choice.finish_reason) == (want.output_ids, want.text, want.finish_reason)
    assert choice.stop_reason == want.stop_reason == " answ" and choice.finish_reason == "stop"
    assert choice.logprobs.token_logprobs == want.output_logprobs
    assert len(choice.logprobs.top_logprobs) == len(want.top_logprobs)
    for got, top in zip(choice.logprobs.top_logprobs, want.top_logprobs):  # keyed by token text, most likely first
        ranked = sorted(top.items(), key=lambda kv: kv[1].rank)
        assert got == {offline.tokenizer.decode([t]): lp.logprob for t, lp in ranked}
        assert list(got.values()) == sorted(got.values(), reverse=True) or len(set(got)) < len(ranked)
    assert choice.prompt_logprobs[0] is None
    for got, ref in zip(choice.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert {int(t): v["logprob"] for t, v in got.items()} == {t: lp.logprob for t, lp in ref.items()}


def test_completion_of_several_token_id_prompts(client, offline):
    prompts = [[5, 6, 7, 8], [9, 10]]
    want = offline.generate(prompts, SamplingParams(n=2, max_tokens=5, seed=8))
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, seed=8,
                                  extra_body={"return_token_ids": True})
    assert [(c.prompt_token_ids, c.token_ids) for c in r.choices] == [(x.prompt_ids, x.output_ids) for x in want]


def test_chat_renders_messages_and_tools_with_the_template(client, offline, llama_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 34?"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    (want,) = offline.generate([prompt_ids], SamplingParams(max_tokens=6, seed=1))
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=6, seed=1, logprobs=True,
                                       top_logprobs=3, extra_body={"return_token_ids": True})
    (choice,) = r.choices
    assert r.model_extra["prompt_token_ids"] == prompt_ids
    assert choice.token_ids == want.output_ids and choice.message.content == want.text
    assert [e.logprob for e in choice.logprobs.content] == want.output_logprobs
    for entry, token in zip(choice.logprobs.content, want.output_ids):
        ranked = [t.logprob for t in entry.top_logprobs]
        assert len(ranked) >= 3 and ranked[:3] == sorted(ranked[:3], reverse=True)
        assert entry.token == tokenizer.decode([token])
    assert r.usage.prompt_tokens == len(prompt_ids)


def test_streaming_adds_up_to_the_whole_response(client):
    kwargs = dict(model=MODEL, prompt=[[11, 12, 13], [14, 15]], n=2, max_tokens=7, seed=4, logprobs=0,
                  extra_body={"return_token_ids": True})
    whole = client.completions.create(**kwargs)
    text, ids, logprobs, finish = {}, {}, {}, {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            ids.setdefault(c.index, []).extend(c.token_ids)
            logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    for c in whole.choices:
        assert (text[c.index], ids[c.index], logprobs[c.index], finish[c.index]) == (
            c.text, c.token_ids, c.logprobs.token_logprobs, c.finish_reason)
    assert usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "Hello world!"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=2)
    pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, seed=2, stream=True)]
    assert "".join(pieces) == reply.choices[0].message.content


def test_64_concurrent_requests_equal_offline_generate(server, offline):
    prompts = [[3 + (7 * i + j) % 290 for j in range(1 + i % 19)] for i in range(64)]
    params = [SamplingParams(max_tokens=1 + i % 9, seed=500 + i, temperature=1.0, ignore_eos=True) for i in range(64)]
    want = offline.generate(prompts, params)

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as aclient:
            calls = [aclient.completions.create(model=MODEL, prompt=p, max_tokens=sp.max_tokens, seed=sp.seed, logprobs=0,
                                                extra_body={"return_token_ids": True, "ignore_eos": True})
                     for p, sp in zip(prompts, params)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(asyncio.wait_for(main(), 300))
    for r, rollout in zip(responses, want):
        (choice,) = r.choices
        assert choice.token_ids == rollout.output_ids
        assert choice.logprobs.token_logprobs == rollout.output_logprobs


def test_malformed_requests_get_4xx_naming_the_problem_and_the_server_keeps_serving(client, server, http):
    good = dict(model=MODEL, prompt="Hello", max_tokens=2)
    cases = [
        (dict(max_tokens=-1), 400, "max_tokens"),
        (dict(max_tokens="5"), 400, "max_tokens"),
        (dict(temperature="hot"), 400, "temperature"),
        (dict(prompt=[5] * 600), 400, "max_model_len"),
        (dict(prompt=[10**6]), 400, "outside the vocabulary"),
        (dict(model="gpt-4"), 404, "gpt-4"),
        (dict(extra_body={"max_token": 3}), 400, "max_token"),
        (dict(extra_body={"min_tokens": 5}), 400, "min_tokens"),
        (dict(extra_body={"logit_bias": {"abc": 1.0}}), 400, "logit_bias"),
    ]
    for change, status, named in cases:
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(**{**good, **change})
        assert err.value.status_code == status, (change, err.value)
        assert named in err.value.message, (change, err.value.message)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True,
                                       extra_body={"max_tokens": 0})
    assert err.value.status_code == 400
    stream_too_long = http.post("/v1/completions", json={**good, "prompt": [5] * 600, "stream": True})
    assert stream_too_long.status_code == 400 and "max_model_len" in stream_too_long.json()["error"]["message"]
    bad_json = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, route in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                              ("POST", "/sleep"), ("GET", "/weight_version")]:
            r = httpx.request(method, server.url + route, headers=headers, json=good, timeout=30)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (route, r.text)
    assert http.get("/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert len(client.completions.create(**good).choices[0].text) >= 0


def test_control_routes_update_sleep_wake_abort(client, http, tmp_path, llama_dir):
    before = http.get("/weight_version").json()["weight_version"]
    other = write_tiny_model(tmp_path / "other", TinyModelSpec(seed=7))
    (want,) = Engine.from_pretrained(str(other), **OPTIONS).generate([[5, 6, 7]], SamplingParams(max_tokens=6, seed=9))
    assert http.post("/update_weights", json={"path": str(tmp_path / "missing")}).status_code == 400
    r = http.post("/update_weights", json={"path": str(other)})
    assert r.status_code == 200 and r.json()["weight_version"] == before + 1
    got = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=6, seed=9, extra_body={"return_token_ids": True})
    assert got.choices[0].token_ids == want.output_ids
    assert http.post("/update_weights", json={"path": str(llama_dir)}).json()["weight_version"] == before + 2

    assert http.post("/sleep", json={"level": 1}).status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    asleep = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert asleep.status_code == 503 and "asleep" in asleep.json()["error"]["message"]
    assert http.post("/wake_up", json={}).status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}

    stream = client.completions.create(model=MODEL, prompt=[3, 4, 5], max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True, "request_id": "long-one", "return_token_ids": True})
    tokens, finish, aborted = [], None, None
    for chunk in stream:
        for c in chunk.choices:
            tokens += c.token_ids
            finish = c.finish_reason or finish
        if len(tokens) >= 3 and aborted is None:
            aborted = http.post("/abort", json={"request_id": "long-one"}).json()
    assert aborted == {"num_aborted": 1, "request_ids": ["long-one"]}
    assert finish == "abort" and 3 <= len(tokens) < 400
    assert http.post("/abort", json={"request_id": "long-one"}).json()["num_aborted"] == 0


def test_weights_update_while_a_request_streams(client, http, tmp_path, llama_dir):
    other = write_tiny_model(tmp_path / "other", TinyModelSpec(seed=5))
    before = http.get("/weight_version").json()["weight_version"]
    stream = client.completions.create(model=MODEL, prompt=[3, 4, 5], max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    versions, updated = [], None
    for chunk in stream:
        for c in chunk.choices:
            versions += c.weight_versions
        if len(versions) >= 3 and updated is None:
            updated = http.post("/update_weights", json={"path": str(other), "in_flight": "keep"})
    assert updated.status_code == 200 and updated.json()["weight_version"] == before + 1
    assert versions[0] == before and versions[-1] == before + 1 and versions == sorted(versions)
    refused = http.post("/update_weights", json={"path": str(llama_dir), "in_flight": "sometimes"})
    assert refused.status_code == 400 and "in_flight" in refused.json()["error"]["message"]
    assert http.post("/update_weights", json={"path": str(llama_dir)}).json()["weight_version"] == before + 2


def test_a_client_that_leaves_a_stream_aborts_its_request(server, http):
    engine = server.app.state.server.engine

    def busy() -> bool:
        return server.run(engine.has_unfinished())

    body = {"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 500, "ignore_eos": True}
    start = time.monotonic()
    assert len(http.post("/v1/completions", json=body).json()["choices"][0]["text"]) > 0
    whole = time.monotonic() - start  # the time all 500 tokens take
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()  # held: a dropped line iterator closes the connection
        assert next(lines).startswith("data: ")
        assert busy()
    left = time.monotonic()
    while busy() and time.monotonic() - left < 30:
        time.sleep(0.01)
    assert time.monotonic() - left < whole / 2  # aborted, not run to its end
    assert http.get("/health").json() == {"status": "ok"}


def test_multi_turn_tool_conversation_reuses_the_prefix_cache(client, llama_dir):
    spec = importlib.util.spec_from_file_location("multi_turn_tools", ROOT / "examples" / "multi_turn_tools.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(example)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    traj = example.run_conversation(client, MODEL, tokenizer, turns=3, max_tokens=12)
    assert traj.cached_tokens[0] == 0 and all(c > 0 for c in traj.cached_tokens[1:])
    assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs)
    model_positions = [i for i, m in enumerate(traj.loss_mask) if m]
    assert all(traj.logprobs[i] is not None for i in model_positions)
    assert all(lp is None for lp, m in zip(traj.logprobs, traj.loss_mask) if not m)
    # the tool results are in the conversation, outside the mask, exactly as the template renders them
    tool_text = tokenizer.decode([t for t, m in zip(traj.token_ids, traj.loss_mask) if not m])
    assert tool_text.count("<|im_start|>tool") == 2 and json.dumps(example.call_tool("")) in tool_text


def test_shutdown_frees_the_engine(llama_dir):
    engine = Engine.from_pretrained(llama_dir, **OPTIONS)
    gone = weakref.ref(engine)
    async_engine = AsyncEngine(engine)
    del engine
    with ServerThread(create_app(async_engine, MODEL)) as running:
        r = httpx.post(running.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    assert not async_engine.is_running
    gc.collect()
    assert gone() is None


def test_shutdown_stops_the_engine_process(llama_dir):
    app = build_app(llama_dir, MODEL, **OPTIONS)
    engine = app.state.server.engine
    with ServerThread(app) as running:
        r = httpx.post(running.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and engine.exitcode is None
    assert not engine.is_running and engine.exitcode == 0


def test_an_engine_process_that_dies_fails_its_requests_and_health(llama_dir):
    app = build_app(llama_dir, MODEL, **OPTIONS)
    engine = app.state.server.engine
    body = {"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 500, "ignore_eos": True}
    with ServerThread(app) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(engine.pid, signal.SIGKILL)
            events = [line for line in lines if line.startswith("data: ")]
        error = json.loads(events[-2].removeprefix("data: "))["error"]  # the status line was out: reported in the stream
        assert error["code"] == 503 and "engine process" in error["message"], events[-2:]
        assert "killed by SIGKILL" in error["message"], events[-2:]
        assert events[-1] == "data: [DONE]"
        assert http.get("/health").status_code == 503
        after = http.post("/v1/completions", json=body)
        assert after.status_code == 503 and "engine process" in after.json()["error"]["message"]


def test_the_engine_process_pipe_reads_whole_step_messages_under_uvloop(llama_dir, offline):
    """uvicorn runs on uvloop when it is installed, and uvloop makes an fd it watches non-blocking; a step's
    message that had only partly arrived then read as a dead engine process (seen on the H200 at 256 clients).
    Here the last step's message is ~3 MB, against a pipe buffer of 64 KiB (top-20 prompt and output logprobs of
    16 x 4 samples finishing together)."""
    uvloop = pytest.importorskip("uvloop")
    from parity.server.engine_process import EngineProcess

    prompts = [[3 + (5 * i + j) % 290 for j in range(60)] for i in range(16)]
    params = SamplingParams(n=4, max_tokens=16, seed=11, temperature=1.0, ignore_eos=True, logprobs=20, prompt_logprobs=20)
    engine = EngineProcess(llama_dir, **OPTIONS)

    async def main():
        results = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
        return results, os.get_blocking(engine._conn.fileno())

    try:
        results, blocking = uvloop.run(asyncio.wait_for(main(), 300))
    finally:
        engine.shutdown()
    assert blocking
    want = offline.generate(prompts, params)
    got = [rollout for samples in results for rollout in samples]
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert [r.top_logprobs for r in got] == [r.top_logprobs for r in want]
    assert [r.prompt_logprobs for r in got] == [r.prompt_logprobs for r in want]


def test_an_engine_process_not_ready_within_the_startup_timeout_is_killed_with_a_clear_error(llama_dir):
    from parity.server.engine_process import EngineProcess

    with pytest.raises(ValueError, match="startup_timeout must be > 0 seconds, got 0"):
        EngineProcess(llama_dir, startup_timeout=0, **OPTIONS)
    with pytest.raises(TimeoutError, match=r"did not load .* within startup_timeout=0.01 s; killed it") as raised:
        EngineProcess(llama_dir, startup_timeout=0.01, **OPTIONS)  # a spawned interpreter cannot even import torch
    pid = int(str(raised.value).split("(pid ")[1].split(")")[0])
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def test_the_server_log_shows_the_engine_process_start_up_and_readiness(llama_dir, tmp_path):
    """`parity serve`'s stderr holds the engine process's own lines (its pid, its load) and the HTTP process's
    readiness line with the start-up seconds, which add up as measured in each process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "parity.cli.main", "serve", llama_dir, "--port", str(port), "--dtype", "fp32",
           "--device", "cpu", "--max-model-len", "128", "--log-level", "info", "--disable-access-log"]
    import subprocess

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while "Uvicorn running" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200, log.read_text()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": llama_dir, "prompt": [1, 2],
                                                                         "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    engine_lines = [line for line in text.splitlines() if "[parity-engine pid" in line]
    assert any("imports took" in line and llama_dir in line for line in engine_lines), text
    ready = [line for line in text.splitlines() if "[parity-http pid" in line and "is ready after" in line]
    assert len(ready) == 1, text
    total, imports, load = (float(ready[0].split(word)[1].split(" s")[0]) for word in
                            ("ready after ", "imports ", "Engine.from_pretrained "))
    assert 0 < imports and 0 < load and imports + load <= total + 0.2, ready[0]  # each printed to 0.1 s
    assert "/v1/completions" not in text  # --disable-access-log


def test_cli_refuses_bad_arguments_before_loading(llama_dir, capsys):
    from parity.cli.main import main

    assert main(["serve", llama_dir, "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert main(["serve", llama_dir, "--engine-startup-timeout", "0"]) == 2
    assert "--engine-startup-timeout must be > 0 seconds, got 0.0" in capsys.readouterr().err
    assert main(["serve", "/no/such/model"]) == 2
    assert "/no/such/model" in capsys.readouterr().err

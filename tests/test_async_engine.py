"""AsyncEngine: concurrent asyncio callers get exactly what offline generate() gives; abort, updates, bad input."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from parity import Engine, SamplingParams
from parity.engine.async_engine import AsyncEngine, EngineShutdownError, RequestFailedError
from parity.engine.engine import PromptTooLongError
from parity.engine.sleep import EngineAsleepError
from parity.models.weights import hf_named_weights

# fp32 + batch-invariant kernels: a request's tokens and logprobs do not depend on what else runs.
OPTIONS = dict(dtype="fp32", device="cpu", deterministic=True, block_size=4, max_model_len=256)


def make_engine(model_dir: str) -> Engine:
    return Engine.from_pretrained(model_dir, **OPTIONS)


def prompts_and_params(count: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(1, 24))] for _ in range(count)]
    params = [SamplingParams(n=1 + i % 2, temperature=1.0, max_tokens=rng.randint(1, 10), seed=1000 + i, ignore_eos=i % 3 == 0)
              for i in range(count)]
    return prompts, params


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def offline(llama_dir) -> Engine:
    return make_engine(llama_dir)


@pytest.fixture(scope="module")
def halved(llama_dir) -> tuple[Engine, dict[str, torch.Tensor]]:
    """An engine whose weights are half the model's, and those weights by HF name: an update to apply."""
    donor = make_engine(llama_dir)
    with torch.no_grad():
        for p in donor.model.parameters():
            p.mul_(0.5)
    return donor, {name: t.clone() for name, t in hf_named_weights(donor.model)}


@pytest.fixture()
def async_engine(llama_dir):
    engine = AsyncEngine(make_engine(llama_dir))
    yield engine
    engine.shutdown()


def run(coro, timeout: float = 120.0):
    """Run one coroutine on a fresh loop, bounded in time so a hang fails the test instead of the run."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def first_token(engine: AsyncEngine) -> None:
    """Return once a short probe request has streamed a token: every request posted before it is running."""
    async for _ in engine.stream([7], SamplingParams(max_tokens=1)):
        return


def same(a, b) -> None:
    assert (a.output_ids, a.output_logprobs, a.finish_reason) == (b.output_ids, b.output_logprobs, b.finish_reason)


def test_200_concurrent_callers_get_offline_outputs(offline, async_engine):
    prompts, params = prompts_and_params(200)
    reference = offline.generate(prompts, params)
    expected = [[r for r in reference if r.prompt_index == i] for i in range(len(prompts))]

    async def streamed(prompt, p):
        """A stream's deltas, joined per sample, must add up to the finished rollouts."""
        tokens: dict[int, list[int]] = {}
        logprobs: dict[int, list[float]] = {}
        finals = {}
        async for delta in async_engine.stream(prompt, p):
            tokens.setdefault(delta.sample_index, []).extend(delta.token_ids)
            logprobs.setdefault(delta.sample_index, []).extend(delta.logprobs)
            if delta.finish_reason is not None:
                assert delta.sample_index not in finals
                finals[delta.sample_index] = delta.rollout
        for k, rollout in finals.items():
            assert (tokens[k], logprobs[k]) == (rollout.output_ids, rollout.output_logprobs)
        return [finals[k] for k in sorted(finals)]

    async def main():
        calls = [async_engine.generate(pr, p) if i % 4 else streamed(pr, p) for i, (pr, p) in enumerate(zip(prompts, params))]
        return await asyncio.gather(*calls)

    results = run(main())
    for got, want in zip(results, expected):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            same(a, b)
    usage = run(async_engine.call(lambda e: e.kv_cache_usage()))
    assert usage["used_blocks"] == 0


def test_bad_input_fails_alone_with_a_clear_error(offline, async_engine):
    prompts, params = prompts_and_params(6, seed=3)
    reference = offline.generate(prompts, params)
    vocab = offline.model_config.vocab_size
    bad = [
        ([], SamplingParams(), ValueError, "empty prompt"),
        ([vocab + 5], SamplingParams(), ValueError, "outside the vocabulary"),
        ([5] * 300, SamplingParams(), PromptTooLongError, "max_model_len"),
    ]

    async def main():
        good = [async_engine.generate(pr, p) for pr, p in zip(prompts, params)]
        wrong = [async_engine.generate(pr, p) for pr, p, _, _ in bad]
        return await asyncio.gather(*good, *wrong, return_exceptions=True)

    results = run(main())
    for got, i in zip(results, range(len(prompts))):
        for a, b in zip(got, [r for r in reference if r.prompt_index == i]):
            same(a, b)
    for err, (_, _, kind, text) in zip(results[len(prompts):], bad):
        assert isinstance(err, kind) and text in str(err), err

    with pytest.raises(ValueError, match="SamplingParams"):
        run(async_engine.generate([5, 6], {"max_tokens": 3}))

    async def duplicate():
        first = asyncio.ensure_future(async_engine.generate([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True),
                                                            request_id="same"))
        await asyncio.sleep(0)  # let the first caller submit
        with pytest.raises(ValueError, match="'same' is already in flight"):
            await async_engine.generate([8, 9], SamplingParams(max_tokens=2), request_id="same")
        return await first

    (rollout,) = run(duplicate())
    assert len(rollout.output_ids) == 50


def test_abort_mid_stream_returns_partial_output(offline, async_engine):
    prompt = [7, 8, 9, 10, 11]
    params = SamplingParams(n=2, max_tokens=200, ignore_eos=True, seed=5)
    full = offline.generate([prompt], params)

    async def main():
        seen = []
        aborted = None
        async for delta in async_engine.stream(prompt, params, request_id="long"):
            seen.append(delta)
            if aborted is None and sum(len(d.token_ids) for d in seen if d.sample_index == 0) >= 3:
                aborted = await async_engine.abort("long")
        return seen, aborted

    seen, aborted = run(main())
    assert sorted(r.sample_index for r in aborted) == [0, 1]
    finals = [d for d in seen if d.finish_reason is not None]
    assert sorted(d.sample_index for d in finals) == [0, 1] and all(d.finish_reason == "abort" for d in finals)
    assert len(aborted[0].output_ids) >= 3
    for r in aborted:
        assert r.finish_reason == "abort" and len(r.output_ids) < 200
        want = full[r.sample_index]
        assert r.output_ids == want.output_ids[: len(r.output_ids)]
        assert r.output_logprobs == want.output_logprobs[: len(r.output_ids)]
    assert run(async_engine.abort("long")) == []  # already over: nothing to abort, no error
    assert run(async_engine.abort("never-seen")) == []
    assert run(async_engine.call(lambda e: e.kv_cache_usage()))["used_blocks"] == 0


def test_a_slow_reader_gets_the_missed_steps_joined(offline, async_engine):
    prompt, params = [6, 7, 8], SamplingParams(n=2, max_tokens=30, ignore_eos=True, seed=21, logprobs=2)
    want = offline.generate([prompt], params)

    async def main():
        deltas = []
        async for delta in async_engine.stream(prompt, params):
            deltas.append(delta)
            await asyncio.sleep(0.2)  # the engine runs on meanwhile
        return deltas

    deltas = run(main())
    assert len(deltas) < sum(len(r.output_ids) for r in want)
    for r in want:
        mine = [d for d in deltas if d.sample_index == r.sample_index]
        assert [t for d in mine for t in d.token_ids] == r.output_ids
        assert [lp for d in mine for lp in d.logprobs] == r.output_logprobs
        assert len([top for d in mine for top in d.top_logprobs]) == len(r.output_ids)
        assert mine[-1].finish_reason == "length" and [d.finish_reason for d in mine[:-1]] == [None] * (len(mine) - 1)


def test_abort_one_sample_then_continue_it(offline, async_engine):
    prompt = [9, 10, 11, 12, 13]
    params = SamplingParams(n=2, max_tokens=200, ignore_eos=True, seed=31)
    full = offline.generate([prompt], params)

    async def main():
        seen, cut = 0, None
        async for delta in async_engine.stream(prompt, params, request_id="pair"):
            seen += len(delta.token_ids) if delta.sample_index == 1 else 0
            if seen >= 4 and cut is None:
                (cut,) = await async_engine.abort("pair", sample_index=1)
            if delta.rollout is not None and delta.sample_index == 0:
                first = delta.rollout
        (resumed,) = await async_engine.generate(None, SamplingParams(max_tokens=200, ignore_eos=True), continue_from=cut)
        return first, cut, resumed

    first, cut, resumed = run(main())
    same(first, full[0])
    assert cut.finish_reason == "abort" and cut.sample_index == 1 and 4 <= len(cut.output_ids) < 200
    assert resumed.request_id == "pair" and resumed.output_ids[: len(cut.output_ids)] == cut.output_ids
    same(resumed, full[1])


def test_abort_ends_generate_and_cancel_aborts(async_engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True, seed=1)

    async def main():
        waiting = asyncio.ensure_future(async_engine.generate([3, 4, 5], params, request_id="a"))
        cancelled = asyncio.ensure_future(async_engine.generate([3, 4, 6], params, request_id="b"))
        await first_token(async_engine)  # both run now, far from their 200 tokens
        await async_engine.abort("a")
        cancelled.cancel()
        (partial,) = await waiting
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # the cancelled caller's request was aborted, so the engine drains to idle
        usage = await async_engine.call(lambda e: (e.has_unfinished(), e.kv_cache_usage()["used_blocks"]))
        return partial, usage

    partial, usage = run(main())
    assert partial.finish_reason == "abort" and len(partial.output_ids) < 200
    assert usage == (False, 0)


@pytest.mark.parametrize("in_flight", ["keep", "recompute"])
def test_weight_update_between_steps_while_a_request_streams(halved, async_engine, in_flight):
    """An update is applied at a step boundary while a request streams; its tokens record the version that
    sampled them, and later requests see the new weights."""
    donor, new_weights = halved
    prompt = [5, 9, 13, 17]
    params = SamplingParams(max_tokens=120, ignore_eos=True, seed=11)
    (want_new,) = donor.generate([prompt], params)

    async def main():
        versions, streamed = [], []
        async for delta in async_engine.stream(prompt, params, request_id="running"):
            streamed += delta.weight_versions
            if not versions:
                versions.append(await async_engine.update_weights(new_weights, in_flight=in_flight))
            if delta.rollout is not None:
                running = delta.rollout
        (after,) = await async_engine.generate(prompt, params)
        return versions[0], running, after, streamed

    stats, running, after, streamed = run(main())
    assert stats.weight_version == 1
    assert running.output_weight_versions[0] == 0 and running.output_weight_versions[-1] == 1
    assert streamed == running.output_weight_versions == sorted(running.output_weight_versions)
    assert after.weight_version == 1 and set(after.output_weight_versions) == {1}
    same(after, want_new)


def test_weight_update_at_a_step_boundary(halved, async_engine):
    """Updates queue behind the requests posted before them and apply between steps; later requests see them."""
    donor, new_weights = halved
    prompt = [5, 9, 13, 17]
    params = SamplingParams(max_tokens=8, ignore_eos=True, seed=11)
    (want_new,) = donor.generate([prompt], params)

    async def main():
        stats = await async_engine.update_weights(new_weights)
        return stats, await asyncio.gather(*[async_engine.generate(prompt, params) for _ in range(4)])

    stats, after = run(main())
    assert stats.weight_version == 1
    for (rollout,) in after:
        assert rollout.weight_version == 1
        same(rollout, want_new)


def test_failing_step_fails_its_requests_and_the_loop_keeps_serving(offline, async_engine):
    prompt, params = [4, 5, 6, 7], SamplingParams(max_tokens=6, seed=2)
    (want,) = offline.generate([prompt], params)
    good = {name: t.clone() for name, t in hf_named_weights(offline.model)}

    def poison(engine):
        with torch.no_grad():
            next(engine.model.parameters()).fill_(float("nan"))

    async def main():
        await async_engine.call(poison)
        failed = await asyncio.gather(*[async_engine.generate(prompt, params) for _ in range(3)], return_exceptions=True)
        await async_engine.update_weights(good)
        (again,) = await async_engine.generate(prompt, params)
        return failed, again

    failed, again = run(main())
    assert all(isinstance(f, RequestFailedError) and "NonFiniteActivationError" in str(f) for f in failed), failed
    assert again.output_ids == want.output_ids


def test_sleep_and_wake_through_the_loop(async_engine):
    async def main():
        await async_engine.sleep(1)
        with pytest.raises(EngineAsleepError):
            await async_engine.generate([3, 4], SamplingParams(max_tokens=2))
        await async_engine.wake_up()
        return await async_engine.generate([3, 4], SamplingParams(max_tokens=2, ignore_eos=True))

    (rollout,) = run(main())
    assert len(rollout.output_ids) == 2


def test_shutdown_aborts_in_flight_and_refuses_new_work(llama_dir):
    engine = AsyncEngine(make_engine(llama_dir))

    async def main():
        pending = asyncio.ensure_future(engine.generate([3, 4, 5], SamplingParams(max_tokens=200, ignore_eos=True)))
        await first_token(engine)
        await asyncio.to_thread(engine.shutdown)
        return await pending

    (partial,) = run(main())
    assert partial.finish_reason == "abort" and len(partial.output_ids) < 200
    assert not engine.is_running and engine.engine is None
    with pytest.raises(EngineShutdownError):
        run(engine.generate([3, 4], SamplingParams()))
    engine.shutdown()  # idempotent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_concurrent_callers_on_the_gpu_equal_offline_generate(llama_dir):
    """CUDA graphs and Triton kernels driven from the engine thread: 64 callers, bitwise offline in deterministic mode."""
    options = dict(dtype="bf16", device="cuda", deterministic=True, max_model_len=256, kv_cache_memory=2**28)
    prompts, params = prompts_and_params(64, seed=5)
    offline = Engine.from_pretrained(llama_dir, **options)
    reference = offline.generate(prompts, params)
    del offline
    torch.cuda.empty_cache()
    engine = AsyncEngine(Engine.from_pretrained(llama_dir, **options))
    try:
        async def main():
            return await asyncio.gather(*[engine.generate(p, sp) for p, sp in zip(prompts, params)])

        results = run(main())
    finally:
        engine.shutdown()
    for i, got in enumerate(results):
        for a, b in zip(got, [r for r in reference if r.prompt_index == i]):
            same(a, b)

"""Abort (waiting, prefilling, decoding, one sample of n, shared prefix blocks), continuing an aborted
sample, and over-sampling for the tail: no block leaks, and outputs equal uninterrupted runs."""

from __future__ import annotations

import pytest

from parity import Engine, SamplingParams
from parity.models.weights import hf_named_weights

SEEDED = SamplingParams(temperature=1.0, max_tokens=14, seed=5, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dir):
    """Deterministic, so a request's tokens and logprobs do not depend on what else runs beside it."""
    return Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4, deterministic=True,
                                  max_num_batched_tokens=64)


def key(rollouts):
    return [(r.output_ids, r.output_logprobs) for r in rollouts]


def all_blocks_free(engine: Engine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_used_blocks == 0 and all(c == 0 for c in bm.ref_counts)


def generated(engine: Engine, num_seqs: int) -> list[int]:
    """Tokens generated so far by each running sequence, once `num_seqs` run (else [0])."""
    running = engine.scheduler.running
    return [len(s.output_ids) for s in running] if len(running) == num_seqs else [0]


def step_until(engine: Engine, done) -> list:
    finished = []
    while not done():
        finished.extend(engine.step())
    return finished


def test_abort_while_waiting_and_during_prefill(llama_dir):
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4, max_num_batched_tokens=8,
                                    max_num_seqs=1)
    prompt = list(range(10, 40))
    engine.add_request(prompt, SEEDED, request_id="long")
    engine.add_request([5, 6, 7], SEEDED, request_id="queued")  # max_num_seqs=1: waits behind "long"
    engine.step()
    (running,) = engine.scheduler.running
    assert running.request_id == "long" and running.in_prefill and running.num_computed_tokens == 8
    (aborted,) = engine.abort("long")
    assert (aborted.finish_reason, aborted.output_ids, aborted.output_logprobs) == ("abort", [], [])
    (queued,) = engine.abort("queued")
    assert queued.finish_reason == "abort" and queued.output_ids == []
    assert not engine.has_unfinished() and all_blocks_free(engine)
    assert engine.abort("long") == [] and engine.abort("never-seen") == []


def test_abort_during_decode_keeps_what_was_generated(engine):
    (reference,) = engine.generate([[5, 6, 7, 8, 9]], SEEDED)
    engine.add_request([5, 6, 7, 8, 9], SEEDED, request_id="r")
    step_until(engine, lambda: generated(engine, 1) == [6])
    (r,) = engine.abort("r")
    assert r.finish_reason == "abort" and r.request_id == "r"
    assert (r.output_ids, r.output_logprobs) == (reference.output_ids[:6], reference.output_logprobs[:6])
    assert r.output_weight_versions == [0] * 6
    assert not engine.has_unfinished() and all_blocks_free(engine)


def test_abort_one_sample_of_n_and_a_request_sharing_prefix_blocks(engine):
    prompt = list(range(20, 41))  # 21 tokens: 5 full blocks shared by every sample and by the second request
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=9, ignore_eos=True)
    reference = engine.generate([prompt], params)  # leaves the prompt's blocks in the prefix cache
    engine.add_request(prompt, params, request_id="group")
    engine.add_request(prompt, SEEDED, request_id="neighbour")
    step_until(engine, lambda: min(generated(engine, 4)) >= 2)
    tables = [s.block_table for s in engine.scheduler.running]
    assert len({t[0] for t in tables}) == 1  # all four samples hold the prompt's cached first block
    (one,) = engine.abort("group", sample_index=1)
    assert one.sample_index == 1 and one.output_ids == reference[1].output_ids[: len(one.output_ids)]
    (neighbour,) = engine.abort("neighbour")
    assert neighbour.finish_reason == "abort"
    rest = step_until(engine, lambda: not engine.has_unfinished())
    assert key(sorted(rest, key=lambda r: r.sample_index)) == key([reference[0], reference[2]])
    assert all_blocks_free(engine)


def test_abort_all_returns_everything_in_flight(engine):
    for i in range(3):
        engine.add_request([5 + i, 6, 7], SamplingParams(n=2, max_tokens=8, seed=i), request_id=f"r{i}")
    engine.step()
    aborted = engine.abort_all()
    assert sorted((r.request_id, r.sample_index) for r in aborted) == [(f"r{i}", k) for i in range(3) for k in (0, 1)]
    assert all(r.finish_reason == "abort" for r in aborted)
    assert not engine.has_unfinished() and all_blocks_free(engine) and engine.abort_all() == []


def test_continuation_equals_an_uninterrupted_run(engine):
    prompt = [7, 8, 9, 10, 11, 12]
    params = SamplingParams(n=2, temperature=0.9, top_k=40, max_tokens=16, seed=21, ignore_eos=True)
    reference = engine.generate([prompt], params)
    engine.add_request(prompt, params, request_id="c")
    step_until(engine, lambda: min(generated(engine, 2)) >= 5)
    partial = engine.abort("c")
    assert [len(r.output_ids) >= 5 for r in partial] == [True, True]
    one = SamplingParams(temperature=0.9, top_k=40, max_tokens=16, seed=21, ignore_eos=True)
    for r in partial:
        engine.add_request(None, one, continue_from=r)
    engine.step()
    engine.step()
    again = engine.abort_all()  # a continuation can be aborted and continued again
    for r in again:
        engine.add_request(None, one, continue_from=r)
    final = sorted(step_until(engine, lambda: not engine.has_unfinished()), key=lambda r: r.sample_index)
    assert [(r.request_id, r.sample_index, r.finish_reason) for r in final] == [("c", 0, "length"), ("c", 1, "length")]
    assert key(final) == key(reference)
    assert all(r.output_weight_versions == [0] * 16 for r in final)
    assert all_blocks_free(engine)


def test_continuation_refuses_what_cannot_continue(engine):
    (done,) = engine.generate([[5, 6, 7]], SEEDED)
    with pytest.raises(ValueError, match="only an aborted rollout can be continued"):
        engine.add_request(None, SEEDED, continue_from=done)
    engine.add_request([5, 6, 7], SEEDED, request_id="x")
    engine.step()
    (partial,) = engine.abort("x")
    with pytest.raises(ValueError, match="params.n must be 1"):
        engine.add_request(None, SamplingParams(n=2, max_tokens=14), continue_from=partial)
    with pytest.raises(ValueError, match="prompt differs"):
        engine.add_request([5, 6], SEEDED, continue_from=partial)
    with pytest.raises(ValueError, match="nothing left to generate"):
        engine.add_request(None, SamplingParams(max_tokens=len(partial.output_ids)), continue_from=partial)
    assert not engine.has_unfinished()


def test_over_sampling_keeps_the_first_groups_and_carries_the_rest(engine):
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
    # Random stop tokens give the samples different lengths: a tail.
    params = SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=3, stop_token_ids=list(range(40, 70)))
    reference = {(r.prompt_index, r.sample_index): r for r in engine.generate(prompts, params)}

    complete, partial = engine.generate_groups(prompts, params, num_groups_wanted=3)
    assert len(complete) == 3 and not engine.has_unfinished() and all_blocks_free(engine)
    for group in complete:
        assert [r.sample_index for r in group] == [0, 1] and len({r.prompt_index for r in group}) == 1
        assert key(group) == key([reference[(r.prompt_index, r.sample_index)] for r in group])
    done_prompts = {g[0].prompt_index for g in complete}
    assert {(r.prompt_index, r.sample_index) for r in partial} == {
        (i, k) for i in range(6) if i not in done_prompts for k in (0, 1)}
    for r in partial:  # finished or cut short, every partial sample is the start of its uninterrupted run
        ref = reference[(r.prompt_index, r.sample_index)]
        assert r.output_ids == ref.output_ids[: len(r.output_ids)]
        assert r.finish_reason in ("abort", ref.finish_reason)

    # Carried into the next call, the partial groups finish as if never interrupted: nothing is thrown away.
    rest, leftover = engine.generate_groups([], params, num_groups_wanted=3, carried=partial)
    assert leftover == [] and all_blocks_free(engine)
    assert {g[0].prompt_index for g in rest} == set(range(6)) - done_prompts
    for group in rest:
        assert key(group) == key([reference[(r.prompt_index, r.sample_index)] for r in group])
    with pytest.raises(ValueError, match="num_groups_wanted"):
        engine.generate_groups(prompts, params, num_groups_wanted=7)


TAIL = SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=3, stop_token_ids=list(range(40, 70)))


def by_key(rollouts) -> dict:
    return {(r.prompt_ids[0], r.sample_index): r for r in rollouts}


def test_groups_left_in_flight_go_on_through_an_update_and_complete_later(engine):
    """unfinished="keep": the step ends at K groups, the rest decodes on through update_weights(in_flight="keep")
    and completes in the next calls; every sample is trained once, and its tokens before the update equal the
    uninterrupted run's."""
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
    reference = by_key(engine.generate(prompts, TAIL))
    complete, partial = engine.generate_groups(prompts[:4], TAIL, num_groups_wanted=2, unfinished="keep")
    assert len(complete) == 2 and engine.has_unfinished()
    assert all(r.finish_reason != "abort" for r in partial)  # every group started: only finished samples
    for group in complete:
        assert key(group) == key([reference[(r.prompt_ids[0], r.sample_index)] for r in group])
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate([[5, 6]], SEEDED)
    original = {name: t.clone() for name, t in hf_named_weights(engine.model)}
    version = engine.weight_version
    engine.update_weights({name: t * 0.5 for name, t in original.items()}, in_flight="keep")
    more, partial = engine.generate_groups(prompts[4:], TAIL, num_groups_wanted=2, carried=partial, unfinished="keep")
    rest, leftover = engine.generate_groups([], TAIL, num_groups_wanted=2, carried=partial)
    assert leftover == [] and not engine.has_unfinished() and all_blocks_free(engine)
    groups = complete + more + rest
    trained = [r for g in groups for r in g]
    assert sorted(by_key(trained)) == sorted(reference) and len(trained) == len(reference)  # each sample once
    for r in trained:
        ref = reference[(r.prompt_ids[0], r.sample_index)]
        old = r.output_weight_versions.count(version)
        assert r.output_weight_versions == [version] * old + [version + 1] * (len(r.output_ids) - old)
        assert (r.output_ids[:old], r.output_logprobs[:old]) == (ref.output_ids[:old], ref.output_logprobs[:old])
    assert any(0 < r.output_weight_versions.count(version) < len(r.output_ids) for r in trained)  # some ran across it
    engine.update_weights(original)


def test_a_pool_beyond_max_num_seqs_waits_and_is_carried_whole(llama_dir):
    """More groups than seats: the late ones wait; aborted at the step's end, those never started come back
    with no tokens and, carried, finish exactly as an uninterrupted run."""
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4, deterministic=True,
                                    max_num_seqs=4, max_num_batched_tokens=64)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
    reference = by_key(engine.generate(prompts, TAIL))
    complete, partial = engine.generate_groups(prompts, TAIL, num_groups_wanted=1)
    assert any(r.output_ids == [] and r.finish_reason == "abort" for r in partial)
    assert not engine.has_unfinished() and all_blocks_free(engine)
    rest, leftover = engine.generate_groups([], TAIL, num_groups_wanted=5, carried=partial)
    assert leftover == [] and all_blocks_free(engine)
    trained = [r for g in complete + rest for r in g]
    assert len(trained) == len(reference)
    assert all(key([r]) == key([reference[(r.prompt_ids[0], r.sample_index)]]) for r in trained)


def test_groups_in_flight_refuse_other_requests_and_survive_bad_input(engine):
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(4)]
    _, partial = engine.generate_groups(prompts, TAIL, num_groups_wanted=1, unfinished="keep")
    kept = {(s.request_id, s.sample_index) for s in [*engine.scheduler.running, *engine.scheduler.waiting]}
    assert kept
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate_groups([[10**6]], TAIL, num_groups_wanted=1, carried=partial, unfinished="keep")
    assert {(s.request_id, s.sample_index) for s in [*engine.scheduler.running, *engine.scheduler.waiting]} == kept
    with pytest.raises(ValueError, match="unfinished must be"):
        engine.generate_groups([], TAIL, num_groups_wanted=1, unfinished="finish")
    engine.add_request([9, 9, 9], SEEDED, request_id="outsider")
    with pytest.raises(RuntimeError, match="generate_groups"):
        engine.generate_groups([], TAIL, num_groups_wanted=1, carried=partial)
    engine.abort_all()
    assert all_blocks_free(engine)


def test_a_full_batch_admits_more_of_the_pool_only_once_admit_seats_are_free(llama_dir, monkeypatch):
    """Each admission prefills (an eager step without look-ahead), so a full batch takes the pool's next groups
    in bursts of at least admit_seats seats; what the groups generate does not change."""
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4, deterministic=True,
                                    max_num_seqs=6, max_num_batched_tokens=64)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(8)]
    reference = by_key(engine.generate(prompts, TAIL))
    steps, bursts = [0], {}
    step, add = engine._step_or_raise, engine.add_request

    def counted_step():
        steps[0] += 1
        return step()

    def recorded_add(*args, **kwargs):
        free = engine.config.max_num_seqs - len(engine.scheduler.running) - len(engine.scheduler.waiting)
        bursts.setdefault(steps[0], free)  # free seats when the burst began
        return add(*args, **kwargs)

    monkeypatch.setattr(engine, "_step_or_raise", counted_step)
    monkeypatch.setattr(engine, "add_request", recorded_add)
    complete, partial = engine.generate_groups(prompts, TAIL, num_groups_wanted=8, admit_seats=4)
    assert partial == [] and all_blocks_free(engine)
    assert len(bursts) > 1 and all(free >= 4 for at, free in bursts.items() if at > 0)
    trained = [r for g in complete for r in g]
    assert len(trained) == len(reference)
    assert all(key([r]) == key([reference[(r.prompt_ids[0], r.sample_index)]]) for r in trained)
    with pytest.raises(ValueError, match="admit_seats"):
        engine.generate_groups(prompts, TAIL, num_groups_wanted=1, admit_seats=7)


def test_a_pool_beyond_max_num_seqs_leaves_async_scheduling_its_look_ahead(llama_dir, monkeypatch):
    """The pool waits outside the scheduler, so decode steps between admissions queue their successor ahead
    (a sequence waiting in the scheduler would stop that at every step)."""
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4, deterministic=True,
                                    max_num_seqs=6, max_num_batched_tokens=64, async_scheduling=True)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(8)]
    steps, step = [0], engine._step_or_raise

    def counted_step():
        steps[0] += 1
        return step()

    monkeypatch.setattr(engine, "_step_or_raise", counted_step)
    engine.generate_groups(prompts, TAIL, num_groups_wanted=8, admit_seats=4)
    # queued in the scheduler at once, the same groups leave the look-ahead well under three steps in four
    assert engine.pipeline.num_ahead_used >= 0.75 * steps[0]

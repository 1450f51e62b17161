"""Adversarial checks of async scheduling (parity.engine.step_pipeline): random programs of add_request, step,
abort, abort_all, weight updates (kept, recomputed, refused), weights written in place, sleep/wake and
continue_from run on two deterministic engines, one with the look-ahead decode step and one step by step. What
every call returns (each step's finished rollouts, in order, every field), the errors, and the final state (no
request left, every KV block free) must be equal; then targeted edge cases: max_tokens=1, max_model_len,
preemption in a tiny KV pool, a request added while a look-ahead step is queued, chunked prefill beside decodes,
the prefix cache after an update, failing steps; and fast mode, where only rounding may differ."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from parity import Engine, Rollout, SamplingParams
from parity.engine.sequence import Logprob
from parity.models.weights import WeightError, hf_named_weights
from parity.precision.policy import NonFiniteActivationError

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

BLOCK = 4
NUM_BLOCKS = 16  # 64 tokens of KV for the whole engine: long requests preempt each other
MAX_MODEL_LEN = 48
# token ids of the factory tokenizer's corpus, so stop strings can match; programs share these prefixes
PREFIXES = [[285, 223, 363, 348, 282, 268, 371, 270], [360, 223, 351, 295, 223, 359, 265, 264, 271], [5, 6, 7]]
STOP_IDS = [223, 264, 16, 22, 100, 300]


def make_engine(model_dir: str, async_scheduling: bool, num_blocks: int = NUM_BLOCKS, device: str = "cpu",
                **options) -> Engine:
    """Deterministic (batch-invariant kernels: any batching gives the same bits), fp32 on CPU, bf16 with decode
    CUDA graphs on CUDA, 4-token blocks, a 24-token step budget (long prompts are chunked), `num_blocks` KV
    blocks."""
    dtype = "fp32" if device == "cpu" else "bf16"
    options = {"device": device, "dtype": dtype, "block_size": BLOCK, "max_num_batched_tokens": 24,
               "max_model_len": MAX_MODEL_LEN, "deterministic": True, **options}
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    elem = 4 if options["dtype"] == "fp32" else 2
    per_block = 2 * cfg["num_hidden_layers"] * BLOCK * cfg["num_key_value_heads"] * head_dim * elem  # K and V
    engine = Engine.from_pretrained(model_dir, kv_cache_memory=num_blocks * per_block,
                                    async_scheduling=async_scheduling, **options)
    assert engine.scheduler.num_kv_blocks == num_blocks
    return engine


def fields_of(r: Rollout) -> tuple:
    """Every field of a Rollout that a caller sees (routed_experts is None for these dense models)."""
    return (r.request_id, r.prompt_index, r.sample_index, r.prompt_ids, r.output_ids, r.output_logprobs,
            r.output_raw_logprobs, r.top_logprobs, r.prompt_logprobs, r.finish_reason, r.stop_reason, r.text,
            r.weight_version, r.output_weight_versions, r.seed, r.num_cached_prompt_tokens, r.num_preemptions,
            r.error)


def all_blocks_free(engine: Engine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_used_blocks == 0 and all(c == 0 for c in bm.ref_counts)


@dataclass
class Admissions:
    """Which steps of the look-ahead engine could admit waiting sequences: none while a look-ahead step is
    pending (a request added or a seat freed then is admitted a step later). The step-by-step engine replays
    them, so both admit on the same steps and the comparison is of the look-ahead's work; what the later
    admission changes is tested on its own (test_a_request_added_while_a_look_ahead_step_is_pending_*)."""

    recorded: list[bool] = field(default_factory=list)
    replaying: bool = False
    num_replayed: int = 0

    def step(self, engine: Engine) -> list[Rollout]:
        schedule = engine.scheduler.schedule
        if not self.replaying:
            def schedule_as_recorded(admit: bool = True):
                self.recorded.append(admit)  # what the engine allowed (a void look-ahead step lets it admit)
                return schedule(admit=admit)
        else:
            allowed = self.recorded[self.num_replayed] if self.num_replayed < len(self.recorded) else True
            self.num_replayed += 1

            def schedule_as_recorded(admit: bool = True):
                return schedule(admit=allowed)

        engine.scheduler.schedule = schedule_as_recorded
        try:
            return engine.step()
        finally:
            del engine.scheduler.schedule

    def replay(self) -> Admissions:
        return Admissions(self.recorded, replaying=True)


def engine_pair(model_dir: str, device: str = "cpu", **options) -> tuple[tuple[Engine, Engine], list[dict]]:
    """(step by step, look-ahead) engines and three weight sets: the checkpoint's and two perturbations."""
    engines = tuple(make_engine(model_dir, a, device=device, **options) for a in (False, True))
    base = {k: v.clone() for k, v in hf_named_weights(engines[0].model)}
    g = torch.Generator().manual_seed(7)
    weights = [base] + [{k: v + (0.03 * s * torch.randn(v.shape, generator=g)).to(v) * v.float().std().to(v)
                         for k, v in base.items()} for s in (1, 2)]
    return engines, weights


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def pair(llama_dir, request):
    return engine_pair(llama_dir, request.param)


@pytest.fixture(scope="module")
def three_seats(llama_dir):
    """More requests than seats: sequences wait while others decode with look-ahead steps; a seat freed by a
    stop is filled a step later."""
    return engine_pair(llama_dir, num_blocks=24, max_num_seqs=3)


# ------------------------------------------------------------------------------------------ random programs
def random_params(rng: random.Random) -> dict:
    """SamplingParams fields: n > 1, lengths from 1 token, greedy and seeded or unseeded sampling, stop token
    ids and strings, top logprobs (-1: the whole vocabulary), prompt logprobs, a penalty or min_tokens (no
    look-ahead beside those)."""
    kw = {"n": rng.choice([1, 1, 2, 3]), "max_tokens": rng.choice([1, 2, 3, 5, 8, 12, 20]),
          "temperature": rng.choice([0.0, 0.8, 1.0])}
    optional = {  # field: (odds, value)
        "seed": (0.6, lambda: rng.randrange(100)), "stop_token_ids": (0.4, lambda: rng.sample(STOP_IDS, 2)),
        "stop": (0.25, lambda: [rng.choice([" the", "e", "o", " ", "12"])]),
        "logprobs": (0.3, lambda: rng.choice([0, 1, 3, -1])), "prompt_logprobs": (0.15, lambda: rng.choice([0, 2])),
        "presence_penalty": (0.15, lambda: 0.5), "min_tokens": (0.1, lambda: 1), "ignore_eos": (0.3, lambda: True),
        "raw_logprobs": (0.2, lambda: True), "top_k": (0.2, lambda: 20), "top_p": (0.2, lambda: 0.9),
    }
    kw.update({name: value() for name, (odds, value) in optional.items() if rng.random() < odds})
    return kw


def random_program(seed: int, num_ops: int = 32) -> list[tuple]:
    """Operations, a quarter of them add_request and two fifths step(); the rest abort a known, finished or
    unknown id (one sample or all), abort_all, update weights (kept or recomputed, or refused), write a weight
    in place, step until idle, sleep (refused while requests run), continue an aborted sample."""
    rng = random.Random(seed)
    program: list[tuple] = []
    for _ in range(num_ops):
        r = rng.random()
        if r < 0.25:
            prefix = rng.choice([*PREFIXES, []])
            suffix = [rng.randrange(1, 380) for _ in range(rng.randrange(0 if prefix else 1, 9))]
            program.append(("add", prefix + suffix, random_params(rng)))
        elif r < 0.65:
            program.append(("step", rng.randrange(1, 5)))
        elif r < 0.72:
            program.append(("abort", rng.randrange(12), rng.choice([None, 0, 1])))
        elif r < 0.74:
            program.append(("abort_all",))
        elif r < 0.80:
            program.append(("update", rng.choice(["keep", "recompute"]), rng.randrange(3)))
        elif r < 0.82:
            program.append(("bad_update",))
        elif r < 0.84:
            program.append(("in_place",))
        elif r < 0.87:
            program.append(("drain",))
        elif r < 0.91:
            program.append(("sleep", rng.choice([1, 2])))
        else:
            program.append(("continue",))
    return program


def run_program(engine: Engine, weights: list[dict], program: list[tuple], admissions: Admissions) -> list[tuple]:
    """Run `program` from the checkpoint's weights with an empty prefix cache, then drain; return a log of
    what every call returned or raised, and whether requests were in flight after it."""
    engine.update_weights(weights[0])  # idle here: also empties the prefix cache
    log: list[tuple] = []
    aborted: list[Rollout] = []
    params_of: dict[str, SamplingParams] = {}
    num_added = 0

    def finished(tag: str, rollouts: list[Rollout]) -> None:
        aborted.extend(r for r in rollouts if r.finish_reason == "abort")
        log.append((tag, [fields_of(r) for r in rollouts]))

    for op in [*program, ("drain",)]:
        kind = op[0]
        try:
            if kind == "add":
                p = SamplingParams(**op[2])
                request_id = f"r{num_added}"
                num_added += 1
                params_of[request_id] = p
                log.append(("add", engine.add_request(op[1], p, request_id=request_id)))
            elif kind == "step":
                for _ in range(op[1]):
                    finished("step", admissions.step(engine))
            elif kind == "abort":
                finished("abort", engine.abort(f"r{op[1]}", sample_index=op[2]))
            elif kind == "abort_all":
                finished("abort_all", engine.abort_all())
            elif kind == "update":
                stats = engine.update_weights(weights[op[2]], in_flight=op[1])
                log.append(("update", stats.weight_version))
            elif kind == "bad_update":
                bad = dict(weights[1])
                bad["model.norm.weight"] = torch.full_like(bad["model.norm.weight"], math.nan)
                with pytest.raises(WeightError, match="model.norm.weight"):
                    engine.update_weights(bad, in_flight="keep")
            elif kind == "in_place":  # a hook or a test writing a weight between steps, outside update_weights
                with torch.no_grad():
                    engine.model.layers[1].mlp.down_proj.weight.mul_(1.01)
            elif kind == "sleep":
                engine.sleep(level=op[1])  # refused (RuntimeError) with requests in flight
                if op[1] == 2:  # vLLM's order: wake the weights, load them, wake the KV cache
                    engine.wake_up(tags=["weights"])
                    engine.update_weights(weights[0])
                    engine.wake_up(tags=["kv_cache"])
                else:
                    engine.wake_up()
            elif kind == "continue" and aborted:
                rollout = aborted.pop(0)
                p = replace(params_of[rollout.request_id], n=1)
                log.append(("continue", engine.add_request(None, p, continue_from=rollout)))
            elif kind == "drain":
                while engine.has_unfinished():
                    finished("step", admissions.step(engine))
        except (ValueError, RuntimeError) as exc:  # refused by the API: must be refused alike by both engines
            log.append(("refused", kind, type(exc).__name__, str(exc)))
        log.append(("in flight", engine.has_unfinished()))
    assert not engine.has_unfinished() and all_blocks_free(engine)
    return log


def check_program(pair: tuple[tuple[Engine, Engine], list[dict]], seed: int) -> None:
    """Program `seed` gives the same log on both engines, and took look-ahead steps."""
    (step_by_step, ahead), weights = pair
    program = random_program(seed)
    used = ahead.pipeline.num_ahead_used
    admissions = Admissions()
    got = run_program(ahead, weights, program, admissions)
    want = run_program(step_by_step, weights, program, admissions.replay())
    assert got == want
    assert step_by_step.pipeline.num_ahead_used == 0
    assert ahead.pipeline.num_ahead_used > used  # each program took look-ahead steps (1 to 54 of them)


@pytest.mark.parametrize("seed", range(12))
def test_random_programs_give_the_same_calls_and_rollouts(pair, seed):
    check_program(pair, seed)


@pytest.mark.parametrize("seed", range(100, 106))
def test_random_programs_with_more_requests_than_seats(three_seats, seed):
    check_program(three_seats, seed)


# ------------------------------------------------------------------------------------------------ edge cases
def drive(engine: Engine, requests: list[tuple[list[int], SamplingParams]], between=None,
          admissions: Admissions | None = None) -> list[list[tuple]]:
    """Add `requests`, step until idle calling `between(engine, step_number)` after each step; return what each
    step returned."""
    for i, (prompt, p) in enumerate(requests):
        engine.add_request(prompt, p, request_id=f"q{i}", prompt_index=i)
    steps = []
    while engine.has_unfinished():
        steps.append([fields_of(r) for r in (engine.step() if admissions is None else admissions.step(engine))])
        if between is not None:
            between(engine, len(steps))
    assert all_blocks_free(engine)
    return steps


def same_steps(pair_engines, requests, between=None) -> list[list[tuple]]:
    """What each step returns, equal with and without the look-ahead step (admitting on the same steps)."""
    step_by_step, ahead = pair_engines
    used = ahead.pipeline.num_ahead_used
    admissions = Admissions()
    got = drive(ahead, requests, between, admissions)
    want = drive(step_by_step, requests, between, admissions.replay())
    assert got == want
    assert ahead.pipeline.num_ahead_used > used or all(p.max_tokens == 1 for _, p in requests)
    return got


def test_one_and_two_tokens(pair):
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])
    for max_tokens in (1, 2):
        p = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=max_tokens, logprobs=1)
        steps = same_steps(engines, [([5, 6, 7, 8, 9], p), ([40, 41], replace(p, temperature=0.0))])
        assert {r[9] for s in steps for r in s} <= {"length", "stop"}
        assert all(len(r[4]) <= max_tokens for s in steps for r in s)


def test_a_sequence_that_reaches_max_model_len(pair):
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])
    long = [(list(range(20, 20 + MAX_MODEL_LEN - 6)), SamplingParams(temperature=0.9, seed=1, max_tokens=30,
                                                                       ignore_eos=True))]
    steps = same_steps(engines, long)
    (rollout,) = [r for s in steps for r in s]
    assert rollout[9] == "length" and len(rollout[3]) + len(rollout[4]) == MAX_MODEL_LEN


def test_preemption_in_a_tiny_kv_pool(pair):
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])
    # four requests of 9 blocks each in a 16-block pool: the youngest are preempted and recomputed
    requests = [(list(range(10 * i + 1, 10 * i + 13)), SamplingParams(temperature=0.8, seed=i, max_tokens=24,
                                                                        ignore_eos=True, logprobs=2))
                for i in range(4)]
    steps = same_steps(engines, requests)
    assert sum(r[16] for s in steps for r in s) > 0  # num_preemptions
    assert engines[0].scheduler.num_preemptions == engines[1].scheduler.num_preemptions > 0


def test_a_request_added_while_a_look_ahead_step_is_queued(pair):
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])
    queued = []

    def add_shared_prefix(engine: Engine, step: int) -> None:
        if step in (3, 6):
            queued.append(engine.pipeline.ahead is not None)
            # shares q0's prompt blocks: a prefix-cache hit, beside decodes, while q0's next step is queued
            engine.add_request(PREFIXES[0] + [step, 9, 9], SamplingParams(temperature=0.0, max_tokens=4),
                               request_id=f"late{step}")

    same_steps(engines, [(PREFIXES[0] + [1, 2], SamplingParams(temperature=1.0, seed=2, max_tokens=10))],
               add_shared_prefix)
    assert queued == [True, True, False, False]  # only the look-ahead engine (run first) had a step queued


def add_late_request(engine: Engine, step: int) -> None:
    if step == 2:  # q0 decodes, its next step queued ahead by the look-ahead engine
        engine.add_request([40, 41, 42], SamplingParams(temperature=0.9, seed=8, max_tokens=4, logprobs=1), "late")


def step_of(steps: list[list[tuple]], request_id: str) -> int:
    return next(i for i, s in enumerate(steps) if any(r[0] == request_id for r in s))


def test_a_request_added_while_a_look_ahead_step_is_pending_is_admitted_a_step_later(pair):
    """No admission while a look-ahead step is pending: the late request starts one step later than step by
    step (nothing queued is thrown away), and its rollout is the same, bit for bit."""
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])
    requests = [([5, 6, 7], SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True))]
    want, got = (drive(e, requests, add_late_request) for e in engines)
    assert step_of(got, "late") == step_of(want, "late") + 1
    assert sorted(r for s in got for r in s) == sorted(r for s in want for r in s)


@pytest.mark.xfail(strict=True, reason="admission deferred by a pending look-ahead step: a request added between "
                   "steps samples its first token a step later, under weights updated in between")
def test_a_request_added_while_a_look_ahead_step_is_pending_samples_under_the_same_weights(pair):
    """add_request, step(), update_weights(in_flight="keep"), step()...: step by step the late request's first
    token comes from the weights before the update."""
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])

    def add_then_update(engine: Engine, step: int) -> None:
        add_late_request(engine, step)
        if step == 3:
            engine.update_weights(weights[1], in_flight="keep")

    requests = [([5, 6, 7], SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True))]
    want, got = (sorted(r for s in drive(e, requests, add_then_update) for r in s) for e in engines)
    assert got == want


def test_a_recompute_update_while_a_look_ahead_step_is_pending_loses_no_step(pair):
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])

    def recompute(engine: Engine, step: int) -> None:
        if step == 3:
            engine.update_weights(weights[1], in_flight="recompute")

    requests = [([5, 6, 7], SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True))]
    want, got = (drive(e, requests, recompute) for e in engines)
    assert got == want


def test_chunked_prefill_beside_decodes(pair):
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])

    def add_long_prompt(engine: Engine, step: int) -> None:
        if step == 4:  # 40 prompt tokens in 24-token steps: two steps of prefill chunks beside q0's decodes
            engine.add_request(list(range(100, 140)), SamplingParams(temperature=0.0, max_tokens=3,
                                                                       prompt_logprobs=2), request_id="long")

    same_steps(engines, [([5, 6, 7], SamplingParams(temperature=0.7, seed=4, max_tokens=12, ignore_eos=True))],
               add_long_prompt)


def test_prefix_cache_after_an_update_serves_no_older_blocks(pair):
    """A prompt cached under version v, then an in-flight update: the next request with that prompt recomputes
    it under the new weights (equal to a fresh engine loaded with them) in both engines."""
    engines, weights = pair
    prompt = PREFIXES[1] + [7, 7, 7]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, logprobs=1)
    results = []
    for engine in engines:
        engine.update_weights(weights[0])
        engine.generate([prompt], greedy)  # cached under weights[0]
        engine.add_request(PREFIXES[1] + [8], SamplingParams(max_tokens=12, seed=1, ignore_eos=True), "beside")
        engine.step()
        engine.step()
        engine.update_weights(weights[1], in_flight="keep")
        engine.add_request(prompt, greedy, request_id="after")
        out = []
        while engine.has_unfinished():
            out += engine.step()
        results.append(sorted(map(fields_of, out)))
        (after,) = [r for r in out if r.request_id == "after"]
        assert after.num_cached_prompt_tokens == 0 and set(after.output_weight_versions) == {engine.weight_version}
        engine.update_weights(weights[1])  # idle: an empty cache, the same weights
        assert fields_of(engine.generate([prompt], greedy)[0])[4:8] == fields_of(after)[4:8]
    assert results[0] == results[1]


@pytest.mark.parametrize("in_flight", ["keep", "recompute"])
def test_a_block_a_look_ahead_step_took_before_an_update_serves_no_older_prefix(llama_dir, in_flight):
    """The look-ahead step of a growing sequence takes the last free block, the first block of a cached prompt;
    the weights are updated and the sequence aborted before it used the block. Whatever the look-ahead step
    does with that block afterwards, a request with the prompt's first block is computed under the new weights."""
    long_prompt = list(range(100, 124))
    shares_a_block = long_prompt[:4] + [7, 7, 7]
    greedy = SamplingParams(temperature=0, max_tokens=3)
    for async_scheduling in (False, True):
        engine = make_engine(llama_dir, async_scheduling, 8)
        new = {k: v * 1.05 for k, v in hf_named_weights(engine.model)}
        engine.generate([long_prompt], SamplingParams(temperature=0, max_tokens=2))  # blocks 0-5 cached
        engine.add_request([40, 41, 42], SamplingParams(temperature=0, max_tokens=27, ignore_eos=True), "grows")
        engine.step()
        while len(engine.scheduler.running[0].output_ids) < 26:  # its next token, at position 28, needs block 8
            engine.step()
        engine.update_weights(new, in_flight=in_flight)
        engine.abort("grows")
        after = engine.generate([shares_a_block], greedy)[0]
        engine.update_weights(new)  # idle: an empty prefix cache, the same weights
        fresh = engine.generate([shares_a_block], greedy)[0]
        assert after.num_cached_prompt_tokens == 0, async_scheduling
        assert (after.output_ids, after.output_logprobs) == (fresh.output_ids, fresh.output_logprobs)
        assert all_blocks_free(engine)


def test_refused_update_and_request_between_steps_leave_the_queued_step_usable(pair):
    engines, weights = pair
    bad = dict(weights[1])
    bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"].clone()
    bad["model.layers.0.mlp.up_proj.weight"][3, 5] = math.inf
    used = engines[1].pipeline.num_ahead_used
    for e in engines:
        e.update_weights(weights[0])

    def refused(engine: Engine, step: int) -> None:
        if step == 3:
            with pytest.raises(WeightError, match="up_proj"):
                engine.update_weights(bad, in_flight="keep")  # refused before any copy: weights untouched
            with pytest.raises(ValueError, match="outside the vocabulary"):
                engine.add_request([5, 10**6], SamplingParams(), request_id="bad")

    requests = [([5, 6, 7], SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=10, ignore_eos=True))]
    with_refusals = same_steps(engines, requests, refused)
    for e in engines:
        e.update_weights(weights[0])

    def but_versions(steps):  # the update above bumped the weight version
        return [[r[:12] + r[14:] for r in s] for s in steps]

    assert but_versions(same_steps(engines, requests)) == but_versions(with_refusals)  # as if nothing was tried
    assert engines[1].pipeline.num_ahead_used - used >= 2 * 8


@pytest.mark.xfail(strict=True, reason="admission deferred by a pending look-ahead step: groups admitted in the "
                   "last step start a step later, so the partial rollouts carry fewer tokens")
def test_generate_groups_returns_the_same_groups_and_partial_rollouts(llama_dir):
    """Over-sampling for the tail (more groups than seats, admitted in bursts): the complete groups and the
    partial rollouts that a trainer carries across its weight update are those of step by step."""
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(12)]
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10)
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(llama_dir, async_scheduling, 64, max_num_seqs=8)
        complete, partial = engine.generate_groups(prompts, params, num_groups_wanted=4, admit_seats=2)
        results.append(([[fields_of(r) for r in group] for group in complete], [fields_of(r) for r in partial]))
        assert all_blocks_free(engine)
    assert results[1][0] == results[0][0]  # the complete groups are the same
    assert results[1][1] == results[0][1]


@pytest.mark.xfail(strict=True, reason="a write through Parameter.data bumps no version counter: the look-ahead "
                   "step launched under the old weights is taken")
def test_a_weight_written_through_data_between_steps_voids_the_queued_step(pair):
    """`param.data.copy_(new)` is how many trainers' weight-sync hooks write (HF's loaders, vLLM-style
    load_weights); the step after it must run under the new weights, as step by step."""
    engines, weights = pair
    for e in engines:
        e.update_weights(weights[0])

    def write_through_data(engine: Engine, step: int) -> None:
        if step == 4:
            engine.model.layers[0].mlp.down_proj.weight.data.mul_(1.5)

    same_steps(engines, [([5, 6, 7], SamplingParams(n=2, temperature=0.0, max_tokens=10, ignore_eos=True))],
               write_through_data)


@pytest.mark.parametrize("case", ["stop at a cached head", "abort at a cached head", "stop, then reorder"])
def test_a_look_ahead_block_never_used_leaves_the_prefix_cache_as_step_by_step(llama_dir, case):
    """A sequence that stops (or is aborted) after a step needs no block for the step after it; the look-ahead
    step takes one anyway, from the free list's head (a cached block there, or an uncached one in front of a
    cached block). It must go back to the head with its prefix and K/V, so a later request with that prefix
    gets as many cached tokens as step by step."""
    long_prompt = list(range(100, 124))  # 6 blocks, cached after its first run; 7 with its output, 8 in all
    short = [40, 41, 42]
    probe = make_engine(llama_dir, False, 8).generate([short], SamplingParams(temperature=0, max_tokens=8,
                                                                              ignore_eos=True))[0].output_ids
    # output 1 sits at position 4, the first slot of the short prompt's second block (the free list's head:
    # the long request's uncached last block); output 5 at position 8, its third (a cached block)
    last = 1 if case == "stop, then reorder" else 5
    assert probe[last] not in probe[:last]
    cached = []
    for async_scheduling in (False, True):
        engine = make_engine(llama_dir, async_scheduling, 8)
        engine.generate([long_prompt], SamplingParams(temperature=0, max_tokens=2))
        if case.startswith("abort"):
            engine.add_request(short, SamplingParams(temperature=0, max_tokens=8), request_id="short")
            engine.step()  # the prefill
            while len(engine.scheduler.running[0].output_ids) <= last:
                engine.step()
            (stopped,) = engine.abort("short")
        else:
            (stopped,) = engine.generate([short], SamplingParams(temperature=0, max_tokens=8,
                                                                 stop_token_ids=[probe[last]]))
        assert stopped.output_ids == probe[: last + 1]
        if case == "stop, then reorder":
            engine.generate([[50, 51, 52]], SamplingParams(temperature=0, max_tokens=1))  # takes one block
        again = engine.generate([long_prompt + [5, 6]], SamplingParams(temperature=0, max_tokens=2))
        cached.append(again[0].num_cached_prompt_tokens)
    assert cached[0] == 24  # step by step: all six blocks of the first run
    assert cached[1] == cached[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_look_ahead_step_that_fails_does_not_fail_the_step_before_it(llama_dir, device):
    """A token whose embedding overflows fp16 (finite weights: update_weights accepts them) is a stop token, so
    step by step it is sampled but never fed to the model. The look-ahead step feeds it: its inf/nan must not
    fail the step that sampled it, nor the other requests of that step, nor the one that decodes on after it
    (on CUDA the look-ahead replays the decode graph, whose inf/nan flag covers the dropped row too)."""
    results = []
    for async_scheduling in (False, True):
        engine = Engine.from_pretrained(llama_dir, device=device, dtype="fp16", block_size=BLOCK,
                                        kv_cache_memory=1 << 22, async_scheduling=async_scheduling)
        prompt = [5, 6, 7, 8, 9]
        probe = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4))[0].output_ids
        weights = {k: v.clone() for k, v in hf_named_weights(engine.model)}
        stop = probe[1]
        weights["model.embed_tokens.weight"][stop] = torch.finfo(torch.float16).max
        for name in weights:
            if "o_proj" in name:  # attention outputs above fp16's half-ulp at 65504: the residual add overflows
                weights[name] = weights[name] * 100
        engine.update_weights(weights)
        with pytest.raises(NonFiniteActivationError):  # fed to the model, the token fails the step
            engine.generate([prompt + [stop]], SamplingParams(temperature=0, max_tokens=1))
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop]), "stops")
        engine.add_request([40, 41, 42], SamplingParams(temperature=0, max_tokens=2), "beside")
        # greedy, this one never samples the overflowing token (most prompts here do within a few tokens)
        engine.add_request([70, 71, 72], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), "goes on")
        steps = []
        while engine.has_unfinished():
            steps.append([(r.request_id, r.output_ids, r.finish_reason, r.stop_reason) for r in engine.step()])
        results.append(steps)
    finished = {r[0]: r for s in results[0] for r in s}
    assert finished["stops"][2:] == ("stop", stop) and finished["beside"][2] == "length"
    assert finished["goes on"][2] == "length" and len(finished["goes on"][1]) == 6
    assert results[1] == results[0]


# ------------------------------------------------------------------------------------------------- fast mode
GREEDY_REQUESTS = [(PREFIXES[0], SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True)),
                   ([40, 41, 42, 43], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)),
                   (PREFIXES[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]


@pytest.fixture(scope="module")
def fast_pair(llama_dir):
    """Fast mode (no batch-invariant kernels) engine pair, and the step-by-step engine's own largest logprob
    change when the greedy requests run alone instead of in one batch: the size of a change of batching."""
    engines, weights = engine_pair(llama_dir, deterministic=False)
    for engine in engines:  # both, so that both count the same requests (unseeded samples draw by that count)
        alone = [r for prompt, p in GREEDY_REQUESTS for r in engine.generate([prompt], p)]
        batched = engine.generate([p for p, _ in GREEDY_REQUESTS], [p for _, p in GREEDY_REQUESTS])
        if engine is engines[0]:
            batching = max(abs(a - b) for x, y in zip(alone, batched)
                           for a, b in zip(x.output_logprobs, y.output_logprobs))
    assert batching > 0  # fast mode is not batch-invariant here, so this bound means something
    return engines, weights, batching


def agree_to_rounding(a: float, b: float, batching: float) -> bool:
    """Two logprobs of the same token from differently batched fast-mode steps: within twice the measured
    change of batching (a dropped row, then the next steps' inputs differ by as much again), plus 8 ulps."""
    return a == b or abs(a - b) <= 2 * batching + 8 * torch.finfo(torch.float32).eps * max(1.0, abs(a))


def test_fast_mode_greedy_tokens_equal_and_logprobs_agree_to_rounding(fast_pair):
    """Without batch-invariant kernels a dropped look-ahead row changes the batch a step ran in, so logprobs may
    differ in the last bits. Greedy tokens are equal."""
    (step_by_step, ahead), weights, batching = fast_pair
    for e in (step_by_step, ahead):
        e.update_weights(weights[0])
    # on both engines: they must count the same requests for the programs after this test
    stop, _ = (e.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6))[0].output_ids[3]
               for e in (step_by_step, ahead))
    requests = [([5, 6, 7], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop], logprobs=2)),
                *GREEDY_REQUESTS]
    used = ahead.pipeline.num_ahead_used
    want, got = (sorted((r[0], r[2], r[4], r[5]) for s in drive(e, requests) for r in s) for e in (step_by_step, ahead))
    assert [w[:3] for w in want] == [g[:3] for g in got]
    assert all(agree_to_rounding(a, b, batching) for w, g in zip(want, got) for a, b in zip(w[3], g[3]))
    assert ahead.pipeline.num_ahead_used > used


def floats_apart(value, out: list) -> list:
    """`value` (a program log) with every float replaced by None, appending the floats to `out` in order."""
    if isinstance(value, float):
        out.append(value)
        return None
    if isinstance(value, Logprob):
        out.append(value.logprob)
        return value.rank
    if isinstance(value, (list, tuple)):
        return [floats_apart(v, out) for v in value]
    if isinstance(value, dict):
        return {k: floats_apart(v, out) for k, v in value.items()}
    return value


@pytest.mark.parametrize("seed", range(200, 204))
def test_fast_mode_random_programs_agree_to_rounding(fast_pair, seed):
    """The random programs in fast mode, sampled rows included: the same calls, tokens, texts, ranks and
    reasons, and every logprob within rounding (40 programs measured: no token differs, the largest logprob
    difference was about the measured change of batching)."""
    (step_by_step, ahead), weights, batching = fast_pair
    program = random_program(seed)
    admissions = Admissions()
    got, want = [], []
    got_shape = floats_apart(run_program(ahead, weights, program, admissions), got)
    want_shape = floats_apart(run_program(step_by_step, weights, program, admissions.replay()), want)
    assert got_shape == want_shape
    assert all(agree_to_rounding(a, b, batching) for a, b in zip(want, got))



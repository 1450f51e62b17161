"""vLLM's sampling options (stop strings, min_tokens, penalties, logit_bias, allowed_token_ids, top-N and
prompt logprobs), each against a plain-Python reference of its definition, in the engine, and in the
trainer-side recomputation (bit for bit in deterministic mode)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from parity.engine.detokenizer import IncrementalDetokenizer
from parity.engine.logits_processors import TokenCounts, TokenHistory, apply_history_processors
from parity.engine.sampler import process_logits, prompt_logprobs, sample, top_logprobs
from parity.engine.sampling_params import SamplingParams
from parity.testing.factory import train_tokenizer

INF = float("inf")
VOCAB = 40
EOS = (2,)


def reference_shaped(x: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """vLLM's definitions token by token in float64: allowed set, min_tokens, bias, repetition (prompt +
    output), frequency and presence (output only)."""
    x = list(x)
    if p.allowed_token_ids is not None:
        x = [v if i in p.allowed_token_ids else -INF for i, v in enumerate(x)]
    if len(output) < p.min_tokens:
        for t in {*p.stop_token_ids, *EOS}:
            x[t] = -INF
    for t, b in p.logit_bias.items():
        x[t] += b
    count = Counter(output)
    for i in range(len(x)):
        if i in prompt or count[i]:
            x[i] = x[i] / p.repetition_penalty if x[i] > 0 else x[i] * p.repetition_penalty
        x[i] -= p.frequency_penalty * count[i] + p.presence_penalty * (count[i] > 0)
    return x


def reference_log_softmax(x: list[float]) -> list[float]:
    m = max(x)
    z = m + math.log(sum(math.exp(v - m) for v in x if v > -INF))
    return [v - z for v in x]


ROW_PARAMS = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(presence_penalty=1.5, frequency_penalty=0.4, temperature=0.7),
    SamplingParams(logit_bias={3: 4.0, 7: -2.5, 11: 0.5}, temperature=0.5),
    SamplingParams(allowed_token_ids=[1, 2, 5, 9, 30], min_tokens=8, stop_token_ids=[9]),
    SamplingParams(),  # untouched row in a shaped batch
    SamplingParams(repetition_penalty=0.6, frequency_penalty=-1.0, logit_bias={2: 3.0}, min_tokens=2, temperature=0),
]


def _batch(seed: int = 0):
    rng = random.Random(seed)
    logits = torch.randn(len(ROW_PARAMS), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))] for _ in ROW_PARAMS]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 15))] for _ in ROW_PARAMS]
    history = TokenHistory.of_sequences(ROW_PARAMS, prompts, outputs, VOCAB, torch.device("cpu"), EOS)
    return logits, prompts, outputs, history


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_history_processors_match_plain_reference(seed):
    logits, prompts, outputs, history = _batch(seed)
    shaped = apply_history_processors(logits, ROW_PARAMS, history)
    assert torch.equal(shaped[4], logits[4])  # a row without options is left bit for bit
    for row, p in enumerate(ROW_PARAMS):
        expect = torch.tensor(reference_shaped(logits[row].tolist(), p, prompts[row], outputs[row]))
        assert torch.equal(torch.isinf(shaped[row]), torch.isinf(expect))
        finite = torch.isfinite(expect)
        torch.testing.assert_close(shaped[row][finite], expect[finite].float(), rtol=1e-6, atol=1e-6)


def test_bias_and_penalties_act_before_temperature():
    logits, prompts, outputs, history = _batch(3)
    processed = process_logits(logits, ROW_PARAMS, history)
    out = sample(logits, ROW_PARAMS, seeds=list(range(6)), steps=[len(o) for o in outputs], history=history)
    for row, p in enumerate(ROW_PARAMS):
        t = p.temperature or 1.0
        shaped = reference_shaped(logits[row].tolist(), p, prompts[row], outputs[row])
        expect = reference_log_softmax([v / t for v in shaped])
        got = torch.log_softmax(processed[row], dim=-1)
        finite = [i for i, v in enumerate(expect) if v > -INF]
        assert got[finite].tolist() == pytest.approx([expect[i] for i in finite], abs=1e-5)
        assert out.logprobs[row] == pytest.approx(expect[out.token_ids[row]], abs=1e-5)
        if p.greedy:  # greedy takes the argmax of the shaped logits, not of the raw ones
            assert out.token_ids[row] == max(range(VOCAB), key=lambda i: shaped[i])
    # (x + b) / T differs from x / T + b: the bias row's distribution is the former
    p = ROW_PARAMS[2]
    after = reference_log_softmax([v / p.temperature + p.logit_bias.get(i, 0.0) for i, v in enumerate(logits[2].tolist())])
    assert torch.log_softmax(processed[2], -1)[3].item() != pytest.approx(after[3], abs=1e-3)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = [SamplingParams(min_tokens=3, stop_token_ids=[5])] * 2
    logits = torch.zeros(2, VOCAB)
    history = TokenHistory.of_sequences(params, [[1], [1]], [[7, 8], [7, 8, 9]], VOCAB, torch.device("cpu"), EOS)
    shaped = apply_history_processors(logits, params, history)
    assert shaped[0, 5] == -INF and shaped[0, EOS[0]] == -INF and torch.isfinite(shaped[0]).sum() == VOCAB - 2
    assert torch.isfinite(shaped[1]).all()  # three tokens generated: EOS and stop ids allowed again


def test_positions_history_equals_the_engines_history_at_every_step():
    """The trainer's running counts (one row per output position) equal the engine's per-step scatter."""
    rng = random.Random(4)
    params = ROW_PARAMS[:3]
    prompts = [[rng.randrange(VOCAB) for _ in range(5)] for _ in params]
    outputs = [[rng.randrange(8) for _ in range(9)] for _ in params]
    trainer = TokenHistory.of_positions(params, prompts, outputs, VOCAB, torch.device("cpu"), EOS)
    row = 0
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        for t in range(len(output)):
            engine = TokenHistory.of_sequences([params[i]], [prompt], [output[:t]], VOCAB, torch.device("cpu"), EOS)
            if engine.output_counts is None:  # no penalty: the engine builds no counts, the trainer's stay 0
                assert not trainer.output_counts[row].any()
            else:
                assert torch.equal(trainer.output_counts[row], engine.output_counts[0])
            if params[i].repetition_penalty != 1.0:
                assert torch.equal(trainer.prompt_mask[row], engine.prompt_mask[0])
            assert trainer.num_generated[row] == t
            row += 1


def test_device_counts_follow_the_token_lists_through_steps_and_reused_rows():
    """The engine's TokenCounts (filled once, +1 per sampled token, rows reused after release, buffer grown)
    give the same history as building it from the token lists every step."""
    from types import SimpleNamespace

    rng = random.Random(7)
    counts = TokenCounts()
    live = []
    for step in range(30):
        if step % 4 == 0:  # a new sequence joins, with or without penalties
            p = ROW_PARAMS[step // 4 % len(ROW_PARAMS)]
            live.append(SimpleNamespace(seq_id=step, params=p, prompt_ids=[rng.randrange(VOCAB) for _ in range(6)],
                                        output_ids=[]))
        if step % 7 == 6:  # the oldest finishes and gives its row back
            counts.release(live.pop(0))
        expect = TokenHistory.of_sequences([s.params for s in live], [s.prompt_ids for s in live],
                                           [s.output_ids for s in live], VOCAB, torch.device("cpu"), EOS)
        got = counts.history(live, VOCAB, torch.device("cpu"), EOS)
        assert got.num_generated == expect.num_generated
        for name in ("output_counts", "prompt_mask"):
            want = getattr(expect, name)
            assert (getattr(got, name) is None) == (want is None)
            if want is not None:
                logits = torch.randn(len(live), VOCAB)
                torch.testing.assert_close(apply_history_processors(logits, [s.params for s in live], got),
                                           apply_history_processors(logits, [s.params for s in live], expect),
                                           rtol=0, atol=0)
        tokens = [rng.randrange(VOCAB) for _ in live]
        counts.add_sampled(live, tokens)
        for s, t in zip(live, tokens):
            s.output_ids.append(t)
    for s in list(live):
        counts.release(s)
    assert counts.counts is None  # nothing held once every sequence finished


def test_top_logprobs_ranks_against_a_sort():
    logprobs = torch.log_softmax(torch.randn(4, 30, generator=torch.Generator().manual_seed(5)), -1)
    chosen = torch.tensor([0, 7, 29, 3])
    out = top_logprobs(logprobs, chosen, [3, None, 0, -1])
    assert out[1] is None
    for row, n in [(0, 3), (2, 0), (3, 30)]:
        values = logprobs[row].tolist()
        order = sorted(range(30), key=lambda i: -values[i])
        expect = {t: (values[t], j + 1) for j, t in enumerate(order[:n])}
        c = int(chosen[row])
        expect.setdefault(c, (values[c], sum(v >= values[c] for v in values)))
        assert {t: (lp.logprob, lp.rank) for t, lp in out[row].items()} == pytest.approx(expect)


def test_prompt_logprobs_in_slices_equal_one_pass():
    head = torch.nn.Linear(8, VOCAB)
    hidden = torch.randn(11, 8, generator=torch.Generator().manual_seed(8))
    targets = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(9)).tolist()
    whole = top_logprobs(torch.log_softmax(head(hidden), -1), torch.tensor(targets), [3] * 11)
    sliced = prompt_logprobs(hidden, targets, 3, head, rows_per_slice=4)
    # the same tokens and ranks; values to float32 rounding (a CPU matmul's sums may depend on the row count)
    assert [{t: lp.rank for t, lp in row.items()} for row in sliced] == [{t: lp.rank for t, lp in row.items()}
                                                                          for row in whole]
    assert [lp.logprob for row in sliced for lp in row.values()] == pytest.approx(
        [lp.logprob for row in whole for lp in row.values()], rel=1e-6)


# ---------------------------------------------------------------------------------- stop strings
@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(384)


def reference_stop(tokenizer, ids, stop, include, min_tokens=0):
    """vLLM's rule on full decodes: the first prefix ids[:k] whose text holds a stop string ending after the
    text of the first min_tokens tokens (the first of the list if several): (k, stop, cut text)."""
    decode = lambda n: tokenizer.decode(ids[:n], skip_special_tokens=True)
    boundary = len(decode(min_tokens).rstrip("\ufffd"))  # an unfinished character is not text yet
    for k in range(min_tokens + 1, len(ids) + 1):
        text = decode(k)
        for s in stop:
            at = text.find(s, max(0, boundary - len(s) + 1))
            if at != -1:
                return k, s, text[: at + (len(s) if include else 0)]
    return None


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_spanning_tokens_match_full_decodes(tokenizer, include):
    rng = random.Random(6)
    corpus = "What is 12 + 34? The answer is 46. Sort the list 5 3 9 1 and answer 1 3 5 9."
    ids = tokenizer.encode(corpus)
    spanning = 0
    for trial in range(60):
        if trial % 2:
            ids = [rng.randrange(len(tokenizer)) for _ in range(30)]
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
        start = rng.randrange(len(text) - 6)
        stop = [text[start : start + rng.randrange(2, 6)], "never occurs"]
        min_tokens = rng.choice([0, 0, 3])
        expect = reference_stop(tokenizer, ids, stop, include, min_tokens)
        detok = IncrementalDetokenizer(tokenizer, stop, include)
        got = None
        for k, t in enumerate(ids, start=1):
            found = detok.step(t, check_stop=k > min_tokens)
            if found is not None:
                got = (k, found, detok.text)
                break
        assert got == expect, (ids, stop, min_tokens)
        if expect is not None:
            k, s, _ = expect
            last = tokenizer.decode(ids[k - 1 : k], skip_special_tokens=True)
            spanning += s not in last
    assert spanning > 10  # most matched stop strings were completed across a token boundary


# ------------------------------------------------------------------------------------ in the engine
@pytest.fixture(scope="module")
def engine(llama_dir):
    from parity import Engine

    # chunks of <= 16 tokens, so long prompts reach prompt_logprobs over several steps
    return Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", deterministic=True, max_model_len=256,
                                  kv_cache_memory=1 << 22, max_num_batched_tokens=16)


PROMPT = "Paged attention keeps the key value cache in fixed size blocks."


@pytest.mark.parametrize("include", [False, True])
def test_engine_stops_on_a_string_spanning_tokens(engine, include):
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    (free,) = engine.generate([PROMPT], SamplingParams(**greedy))
    tok = engine.tokenizer
    pieces = [tok.decode([t]) for t in free.output_ids]
    # a stop string made of the end of token 4 and the start of token 5 (both non-empty)
    k = next(i for i in range(4, len(pieces) - 1) if len(pieces[i]) > 1 and len(pieces[i + 1]) > 1)
    stop = pieces[k][-1] + pieces[k + 1][:1]
    expect = reference_stop(tok, free.output_ids, [stop], include)
    (r,) = engine.generate([PROMPT], SamplingParams(**greedy, stop=[stop], include_stop_str_in_output=include))
    assert expect is not None and r.output_ids == free.output_ids[: expect[0]]
    assert (r.finish_reason, r.stop_reason, r.text) == ("stop", stop, expect[2])
    assert r.output_logprobs == free.output_logprobs[: expect[0]]


def test_engine_min_tokens_holds_back_eos_and_stop_ids(engine):
    eos = engine.model_config.eos_token_ids[0]
    other = 17
    for stop_ids, bias, reason in [([], {eos: 60.0}, None), ([other], {other: 60.0}, other)]:
        base = dict(temperature=1.0, seed=3, max_tokens=10, stop_token_ids=stop_ids, logit_bias=bias)
        (early,) = engine.generate([PROMPT], SamplingParams(**base))
        (held,) = engine.generate([PROMPT], SamplingParams(**base, min_tokens=4))
        stopper = stop_ids[0] if stop_ids else eos
        assert early.output_ids == [stopper]
        assert len(held.output_ids) == 5 and held.output_ids[-1] == stopper and stopper not in held.output_ids[:4]
        assert (held.finish_reason, held.stop_reason) == ("stop", reason)


def test_top_and_prompt_logprobs_match_hf_log_softmax(engine, llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    prompts = [engine.encode(PROMPT), engine.encode("What is 12 + 34? The answer is 46.")]
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logprobs=4, prompt_logprobs=3)
    rollouts = engine.generate(prompts + prompts[:1], params)  # the repeat would hit the prefix cache
    assert rollouts[2].num_cached_prompt_tokens == 0 and rollouts[2].prompt_logprobs == rollouts[0].prompt_logprobs
    for r in rollouts:
        ids = r.prompt_ids + r.output_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # row i predicts ids[i + 1]
        entries = r.prompt_logprobs + r.top_logprobs
        assert len(r.prompt_logprobs) == len(r.prompt_ids) and r.prompt_logprobs[0] is None
        for pos in range(1, len(ids)):
            n = 3 if pos < len(r.prompt_ids) else 4
            row = ref[pos - 1]
            top = row.topk(n)
            expect = {int(t): v.item() for v, t in zip(top.values, top.indices)}
            expect.setdefault(ids[pos], row[ids[pos]].item())
            got = entries[pos]
            assert got.keys() == expect.keys()
            assert [got[t].logprob for t in expect] == pytest.approx(list(expect.values()), abs=1e-4)
            assert got[ids[pos]].rank == int((row >= row[ids[pos]]).sum()) or got[ids[pos]].rank <= n
            assert [got[t].rank for t in list(expect)[:n]] == list(range(1, n + 1))
        assert [e[t].logprob for e, t in zip(r.top_logprobs, r.output_ids)] == r.output_logprobs


PENALISED = [
    SamplingParams(n=2, temperature=0.8, top_k=40, seed=11, max_tokens=14, repetition_penalty=1.4,
                   presence_penalty=0.6, frequency_penalty=0.3, logit_bias={5: 2.0, 9: -3.0}, min_tokens=6),
    SamplingParams(temperature=0, max_tokens=10, repetition_penalty=0.7, frequency_penalty=-0.5,
                   allowed_token_ids=list(range(3, 200)), ignore_eos=True),
]


def test_penalised_rollouts_are_recomputed_bit_for_bit_by_the_trainer(engine):
    from parity.trainer.logprobs import trainer_logprobs
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    prompts = [engine.encode(PROMPT), engine.encode("Sort the list 5 3 9 1 and answer 1 3 5 9.")]
    trainer = parity_model_from_engine(engine, trainable=False)
    for params in PENALISED:
        rollouts = engine.generate(prompts, params)
        scored = token_logprobs(trainer, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts],
                                params=params)
        for r, lp in zip(rollouts, scored):
            assert lp.tolist() == r.output_logprobs  # bitwise: same history, same processing, same kernels
        plain = token_logprobs(trainer, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts],
                               temperature=params.temperature)
        assert any(p.tolist() != r.output_logprobs for p, r in zip(plain, rollouts))  # the processing matters
        out = trainer_logprobs(trainer, rollouts, params)
        assert torch.equal(out.logprobs[out.mask], out.rollout_logprobs[out.mask])
        assert engine.scheduler.token_counts.counts is None  # the device counts went with the finished samples


def test_hf_trainer_applies_the_same_processing(engine, llama_dir):
    from transformers import AutoModelForCausalLM

    from parity.trainer.logprobs import trainer_logprobs

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    rollouts = engine.generate([engine.encode(PROMPT)], PENALISED[0])
    out = trainer_logprobs(hf, rollouts, PENALISED[0], pad_id=0)
    torch.testing.assert_close(out.logprobs[out.mask], out.rollout_logprobs[out.mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[3, 10**6]), "allowed_token_ids"),
        (SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused_before_work(engine, params, field):
    with pytest.raises(ValueError, match=f"{field}: token id 1000000 is outside the vocabulary"):
        engine.generate([PROMPT], params)
    assert not engine.has_unfinished()


@pytest.mark.slow
def test_options_survive_chunking_and_preemption(llama_dir, engine):
    """prompt_logprobs booked once per prompt token, penalty counts and stop strings kept across
    preemption: a cache of 8 blocks for six requests forces recomputation, results equal a roomy run."""
    from parity import Engine

    busy = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", deterministic=True, max_model_len=256,
                                  kv_cache_memory=8 * 2 * 2 * 16 * 2 * 16 * 4, max_num_batched_tokens=16)
    assert busy.scheduler.num_kv_blocks == 8
    rng = random.Random(10)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(15, 30))] for _ in range(6)]
    params = SamplingParams(temperature=0.9, seed=2, max_tokens=12, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.5, logprobs=2, prompt_logprobs=2, stop=["\x00never"])
    key = lambda r: (r.output_ids, r.output_logprobs, r.top_logprobs, r.prompt_logprobs, r.text)
    roomy = [key(r) for r in engine.generate(prompts, params)]
    crowded = busy.generate(prompts, params)
    assert sum(r.num_preemptions for r in crowded) > 0
    assert [key(r) for r in crowded] == roomy

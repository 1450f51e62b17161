"""The rollout file format: round trips, validation errors that name the line, engine and vLLM writers."""

from __future__ import annotations

import json
import math

import pytest

from parity.cli.main import main
from parity.diagnostics.rollout_io import (
    RolloutFormatError,
    RolloutRecord,
    read_rollouts,
    records_from_rollouts,
    records_from_vllm,
    write_rollouts,
)
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout


def _record(**kw) -> RolloutRecord:
    base = dict(prompt_ids=[3, 4, 5], output_ids=[7, 8], logprobs=[-0.5, -1.25], dtype="bf16", engine="parity")
    return RolloutRecord(**{**base, **kw})


def test_round_trip_keeps_every_field(tmp_path):
    recs = [
        _record(raw_logprobs=[-0.25, -float("inf")], sampling_params={"temperature": 0.7, "top_p": 0.9},
                weight_version=3, finish_reason="stop", text="héllo\n", prompt_index=0, sample_index=1,
                request_id="r0", metadata={"step": 12}),
        _record(logprobs=None, raw_logprobs=[-2.0, 0.0], output_ids=[1, 2]),
        _record(output_ids=[], logprobs=[]),
    ]
    path = write_rollouts(tmp_path / "sub" / "r.jsonl", recs)
    assert read_rollouts(path) == recs
    assert len(path.read_text().splitlines()) == 3
    assert math.isinf(read_rollouts(path)[0].raw_logprobs[1])


def _lines(tmp_path, *lines: str):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt_ids": [1], "output_ids": [2], "logprobs": [-0.1]})


@pytest.mark.parametrize("bad, words", [
    ('{"prompt_ids": [1], "output_ids": [2], "logprobs": [-0.1]', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"prompt_ids": [1], "logprobs": []}', "missing required field(s) 'output_ids'"),
    ('{"prompt_ids": [1], "output_ids": [2, 3], "logprobs": [-0.1]}', "'logprobs' has 1 entries but 'output_ids' has 2"),
    ('{"prompt_ids": [1], "output_ids": [2], "logprobs": [NaN]}', "'logprobs[0]' = nan"),
    ('{"prompt_ids": [1], "output_ids": [2], "logprobs": [0.5]}', "'logprobs[0]' = 0.5 is not a log-probability"),
    ('{"prompt_ids": [1], "output_ids": [2], "logprobs": ["x"]}', "'logprobs[0]' must be a number"),
    ('{"prompt_ids": [1], "output_ids": [-2], "logprobs": [-1]}', "'output_ids[0]' must be a non-negative integer"),
    ('{"prompt_ids": [], "output_ids": [2], "logprobs": [-1]}', "'prompt_ids' is empty"),
    ('{"prompt_ids": [1], "output_ids": [2]}', "neither 'logprobs' nor 'raw_logprobs'"),
    ('{"prompt_ids": [1], "output_ids": [2], "logprob": [-1]}', "unknown field(s) 'logprob'"),
    ('{"prompt_ids": [1], "output_ids": [2], "logprobs": [-1], "format_version": 9}', "format_version 9"),
    ('{"prompt_ids": [1], "output_ids": [2], "logprobs": [-1], "sampling_params": {"temperature": -1}}', "temperature"),
])
def test_malformed_line_is_named(tmp_path, bad, words):
    path = _lines(tmp_path, GOOD, "", bad, GOOD)
    with pytest.raises(RolloutFormatError) as e:
        read_rollouts(path)
    assert f"{path}: line 3: " in str(e.value)
    assert words in str(e.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(RolloutFormatError, match="no records"):
        read_rollouts(_lines(tmp_path, "", "  "))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rollouts(tmp_path / "nope.jsonl")


def test_write_refuses_invalid_record(tmp_path):
    with pytest.raises(RolloutFormatError, match="record 1: 'logprobs' has 1 entries"):
        write_rollouts(tmp_path / "r.jsonl", [_record(), _record(logprobs=[-1.0])])
    assert not (tmp_path / "r.jsonl").exists()


def test_records_from_rollouts_maps_fields_and_per_prompt_params():
    rollouts = [
        Rollout("0", 0, 0, [1, 2], [5], [-0.5], "length", output_raw_logprobs=[-0.4], text="a", weight_version=2),
        Rollout("1", 1, 1, [3], [6, 7], [-0.1, -0.2], "stop"),
    ]
    params = [SamplingParams(temperature=0.5, seed=1), SamplingParams(temperature=1.0, top_k=5, n=2)]
    recs = records_from_rollouts(rollouts, params, "fp16", model="m")
    assert [r.sampling_params["temperature"] for r in recs] == [0.5, 1.0]
    assert recs[1].sampling_params["top_k"] == 5 and "raw_logprobs" not in recs[1].sampling_params
    assert recs[0].raw_logprobs == [-0.4] and recs[1].raw_logprobs is None
    assert (recs[0].dtype, recs[0].engine, recs[0].weight_version, recs[0].model) == ("fp16", "parity", 2, "m")
    assert (recs[1].prompt_index, recs[1].sample_index, recs[1].finish_reason) == (1, 1, "stop")


def _vllm_request():
    """A vLLM RequestOutput as JSON: per position the top-2 tokens plus the sampled one."""
    return {
        "request_id": "7",
        "prompt_token_ids": [11, 12],
        "outputs": [
            {"index": 0, "text": "ab", "finish_reason": "length", "token_ids": [5, 9],
             "logprobs": [{"5": {"logprob": -0.3, "rank": 1}, "6": {"logprob": -1.9, "rank": 2}},
                          {"4": {"logprob": -0.2, "rank": 1}, "8": {"logprob": -2.1, "rank": 2},
                           "9": {"logprob": -3.5, "rank": 7, "decoded_token": "b"}}]},
            {"index": 1, "token_ids": [6], "logprobs": [-1.9], "finish_reason": "stop"},
        ],
    }


def test_vllm_conversion_picks_the_sampled_token():
    recs = records_from_vllm([_vllm_request()], "raw_logprobs", {"temperature": 1.0}, dtype="bf16")
    assert [r.raw_logprobs for r in recs] == [[-0.3, -3.5], [-1.9]]
    assert all(r.logprobs is None for r in recs)
    assert [r.sample_index for r in recs] == [0, 1]
    assert recs[0].prompt_ids == [11, 12] and recs[0].request_id == "7" and recs[0].engine == "vllm"
    processed = records_from_vllm(_vllm_request(), "processed_logprobs")
    assert processed[0].logprobs == [-0.3, -3.5] and processed[0].raw_logprobs is None


def test_vllm_conversion_errors():
    req = _vllm_request()
    del req["outputs"][0]["logprobs"][1]["9"]
    with pytest.raises(RolloutFormatError, match="request 0 output 0 position 1: the sampled token 9 is not among"):
        records_from_vllm(req)
    with pytest.raises(ValueError, match="raw_logits"):
        records_from_vllm(_vllm_request(), "raw_logits")
    with pytest.raises(RolloutFormatError, match="needs 'prompt_token_ids' and 'outputs'"):
        records_from_vllm([{"outputs": []}])


def test_convert_vllm_cli(tmp_path, capsys):
    src = tmp_path / "vllm.jsonl"
    src.write_text(json.dumps(_vllm_request()) + "\n" + json.dumps(_vllm_request()) + "\n")
    out = tmp_path / "r.jsonl"
    assert main(["diagnose", "convert-vllm", str(src), str(out), "--logprobs-mode", "processed_logprobs",
                 "--temperature", "0.8", "--top-p", "0.95", "--dtype", "bf16"]) == 0
    recs = read_rollouts(out)
    assert len(recs) == 4 and recs[2].prompt_index == 1
    assert recs[0].logprobs == [-0.3, -3.5] and recs[0].sampling_params == {"temperature": 0.8, "top_p": 0.95}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_vllm_request()) + "\n{oops\n")
    assert main(["diagnose", "convert-vllm", str(bad), str(tmp_path / "x.jsonl")]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


def test_generate_out_writes_a_rollout_file(llama_dir, tmp_path):
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", llama_dir, "--prompt", "Hello", "--n", "2", "--max-tokens", "4",
                 "--temperature", "1", "--dtype", "fp32", "--device", "cpu", "--out", str(out)]) == 0
    recs = read_rollouts(out)
    assert [r.sample_index for r in recs] == [0, 1]
    for r in recs:
        assert len(r.output_ids) == len(r.logprobs) == len(r.raw_logprobs) <= 4
        assert r.logprobs == r.raw_logprobs  # temperature 1, no filters: processed == raw
        assert (r.dtype, r.engine, r.weight_version, r.sampling_params["n"]) == ("fp32", "parity", 0, 2)

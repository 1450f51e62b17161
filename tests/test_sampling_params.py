"""SamplingParams refuses a bad field on construction, naming the field and the value."""

from __future__ import annotations

import numpy as np
import pytest

from parity import SamplingParams


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n", 0, r"n must be >= 1, got 0"),
        ("n", 2.5, r"n must be an int, got 2\.5 \(float\)"),
        ("n", True, r"n must be an int, got True \(bool\)"),
        ("n", "2", r"n must be an int, got '2' \(str\)"),
        ("temperature", float("nan"), r"temperature must be a finite number, got nan"),
        ("temperature", float("inf"), r"temperature must be a finite number, got inf"),
        ("temperature", -0.5, r"temperature must be >= 0\.0, got -0\.5"),
        ("temperature", "0.7", r"temperature must be a number, got '0\.7' \(str\)"),
        ("top_p", 0.0, r"top_p must be > 0\.0 and <= 1\.0, got 0\.0"),
        ("top_p", 1.5, r"top_p must be > 0\.0 and <= 1\.0, got 1\.5"),
        ("top_p", float("nan"), r"top_p must be a finite number"),
        ("top_k", -2, r"top_k must be >= -1, got -2"),
        ("top_k", 4.0, r"top_k must be an int, got 4\.0 \(float\)"),
        ("min_p", float("nan"), r"min_p must be a finite number"),
        ("min_p", 1.01, r"min_p must be >= 0\.0 and <= 1\.0, got 1\.01"),
        ("seed", "abc", r"seed must be an int, got 'abc' \(str\)"),
        ("seed", 2**64, r"seed must be >= 0 and < 9223372036854775808, got 18446744073709551616"),
        ("seed", 2**63, r"seed must be >= 0 and < 9223372036854775808"),
        ("seed", -1, r"seed must be >= 0"),
        ("seed", 1.0, r"seed must be an int, got 1\.0 \(float\)"),
        ("max_tokens", 0, r"max_tokens must be >= 1, got 0"),
        ("max_tokens", None, r"max_tokens must be an int, got None \(NoneType\)"),
        ("stop_token_ids", None, r"stop_token_ids must be a list of ints, got None \(NoneType\)"),
        ("stop_token_ids", 5, r"stop_token_ids must be a list of ints, got 5 \(int\)"),
        ("stop_token_ids", "ab", r"stop_token_ids must be a list of ints, got 'ab' \(str\)"),
        ("stop_token_ids", [2, 1.5], r"stop_token_ids\[1\] must be an int, got 1\.5 \(float\)"),
        ("stop_token_ids", [-3], r"stop_token_ids\[0\] must be >= 0, got -3"),
        ("ignore_eos", 1, r"ignore_eos must be True or False, got 1 \(int\)"),
        ("raw_logprobs", "yes", r"raw_logprobs must be True or False, got 'yes' \(str\)"),
    ],
)
def test_bad_field_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_good_values_kept_and_normalised():
    p = SamplingParams(n=np.int64(3), temperature=1, top_p=0.9, top_k=-1, min_p=0.0, seed=2**63 - 1,
                       max_tokens=np.int32(8), stop_token_ids=(7, np.int64(9)), ignore_eos=True)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (3, 1.0, 0.9, -1, 2**63 - 1, 8)
    assert type(p.n) is int and type(p.temperature) is float and type(p.max_tokens) is int
    assert p.stop_token_ids == [7, 9] and all(type(t) is int for t in p.stop_token_ids)
    assert SamplingParams(temperature=0).greedy and SamplingParams(seed=0).seed == 0

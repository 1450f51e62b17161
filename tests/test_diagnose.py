"""`parity diagnose`: an end-to-end run on the tiny model, compare with known injected noise, the
like-with-like and same-token checks, exit codes, --help, and W&B offline logging."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from parity.cli.diagnose import read_prompts
from parity.cli.main import main
from parity.diagnostics.plots import PLOT_FILES
from parity.diagnostics.rollout_io import read_rollouts, write_rollouts

# mismatch_metrics names (parity.precision.metrics) the tests read
ABS_MEAN, ABS_MAX, KL = "logp_abs_diff_mean", "logp_abs_diff_max", "mismatch_kl"


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    """One `parity diagnose run` with no --model and no real model installed (the built-in tiny model,
    written to a fresh cache)."""
    from parity.models import aliases

    root = tmp_path_factory.mktemp("diagnose")
    mp = pytest.MonkeyPatch()
    mp.setenv("PARITY_CACHE", str(root / "cache"))
    mp.setattr(aliases, "is_installed", lambda alias: False)
    out = root / "out"
    try:
        rc = main(["diagnose", "run", "--dtypes", "bf16,fp32", "--n", "2", "--max-tokens", "8", "--device", "cpu",
                   "--deterministic", "--micro-batch", "4", "--out", str(out)])
    finally:
        mp.undo()
    assert rc == 0
    return out


def _pairings(out) -> dict[str, dict]:
    return {p["name"]: p for p in json.loads((out / "report.json").read_text())["pairings"]}


def test_run_writes_every_file(run_out):
    for name in ["report.json", "tokens.csv", *PLOT_FILES.values()]:
        assert (run_out / name).is_file() and (run_out / name).stat().st_size > 0, name
    for name in PLOT_FILES.values():
        assert (run_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in ["bf16/engine", "bf16/hf", "bf16/fp32", "fp32/engine", "fp32/hf"]:
        recs = read_rollouts(run_out / "rollouts" / f"{path}.jsonl")
        assert len(recs) == 3 * 2  # built-in prompts x n
    report = json.loads((run_out / "report.json").read_text())
    names = set(_pairings(run_out))
    assert {"bf16: engine vs hf", "bf16: engine vs fp32", "bf16: hf vs fp32", "fp32: engine vs hf"} <= names
    assert report["worst_tokens"] and "[[" in report["worst_tokens"][0]["context"]
    assert report["config"]["dtypes"] == ["bf16", "fp32"] and report["config"]["temperature"] == 1.0


def test_tokens_csv_matches_rollout_files(run_out):
    rows = list(csv.DictReader((run_out / "tokens.csv").open()))
    bf16 = [r for r in rows if r["token_set"] == "bf16"]
    engine = read_rollouts(run_out / "rollouts" / "bf16" / "engine.jsonl")
    hf = read_rollouts(run_out / "rollouts" / "bf16" / "hf.jsonl")
    assert len(bf16) == sum(len(r.output_ids) for r in engine)
    flat_engine = [x for r in engine for x in r.logprobs]
    flat_hf = [x for r in hf for x in r.logprobs]
    assert [float(r["logp_engine"]) for r in bf16] == flat_engine
    assert [float(r["logp_hf"]) for r in bf16] == flat_hf
    assert [int(r["token_id"]) for r in bf16] == [t for r in engine for t in r.output_ids]
    assert all(r["logp_fp32"] == "" for r in rows if r["token_set"] == "fp32")  # hf is the fp32 reference there


def test_fp32_pairing_is_near_zero_and_bf16_is_not(run_out):
    """fp32 engine vs fp32 HF is not bitwise (paged attention and fused QKV vs HF's SDPA: a different
    summation order) but agrees to ~1e-6; bf16 rounding is orders of magnitude larger."""
    p = _pairings(run_out)
    fp32 = p["fp32: engine vs hf"]["metrics"]
    assert fp32[ABS_MAX] < 1e-4 and fp32[ABS_MEAN] < 1e-5
    assert p["bf16: engine vs fp32"]["metrics"][ABS_MEAN] > 100 * fp32[ABS_MEAN]


def test_deterministic_engine_equals_parity_forward_bitwise(run_out):
    """--deterministic: the engine's logprobs and parity's trainer-side forward agree bit for bit."""
    p = _pairings(run_out)
    for dtype in ("bf16", "fp32"):
        assert p[f"{dtype}: engine vs parity"]["metrics"][ABS_MAX] == 0.0
    engine = read_rollouts(run_out / "rollouts" / "bf16" / "engine.jsonl")
    forward = read_rollouts(run_out / "rollouts" / "bf16" / "parity.jsonl")
    assert [r.logprobs for r in engine] == [r.logprobs for r in forward]


def test_compare_file_with_itself_is_exactly_zero(run_out, tmp_path):
    path = run_out / "rollouts" / "fp32" / "engine.jsonl"
    assert main(["diagnose", "compare", str(path), str(path), "--out", str(tmp_path)]) == 0
    (pairing,) = _pairings(tmp_path).values()
    assert pairing["metrics"][ABS_MAX] == 0.0 and pairing["metrics"][KL] == 0.0


def test_compare_reports_injected_noise_of_known_size(run_out, tmp_path):
    """B = A + δ·s_t with random signs s_t = ±1 (minus where + would leave the log domain):
    |Δlogp| is δ on every token, and the KL estimate mean(logp_A − logp_B) is −δ·mean(s)."""
    delta = 0.0123
    recs = read_rollouts(run_out / "rollouts" / "bf16" / "engine.jsonl")
    rng = np.random.default_rng(0)
    signs = []
    for r in recs:
        s = rng.choice([-1.0, 1.0], size=len(r.logprobs))
        s[np.asarray(r.logprobs) > -2 * delta] = -1.0
        r.logprobs = [lp + delta * si for lp, si in zip(r.logprobs, s)]
        r.raw_logprobs, r.engine = None, "noisy"
        signs.extend(s)
    a, b = run_out / "rollouts" / "bf16" / "engine.jsonl", write_rollouts(tmp_path / "noisy.jsonl", recs)
    assert main(["diagnose", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    (pairing,) = _pairings(tmp_path / "cmp").values()
    m = pairing["metrics"]
    assert m[ABS_MEAN] == pytest.approx(delta, rel=1e-6)
    assert m[ABS_MAX] == pytest.approx(delta, rel=1e-6)
    assert m[KL] == pytest.approx(-delta * np.mean(signs), abs=1e-9)
    assert m["mismatch_k3_kl"] == pytest.approx(np.mean(np.expm1(delta * np.array(signs)) - delta * np.array(signs)),
                                                 rel=1e-6)
    assert (m["ratio_min"], m["ratio_max"]) == pytest.approx((np.exp(-delta), np.exp(delta)), rel=1e-9)
    assert m["ratio_fraction_outside"] == 0.0 and m["num_tokens"] == len(signs)
    assert pairing["rollout"] == "parity-bf16" and pairing["train"] == "noisy-bf16"
    rows = list(csv.DictReader((tmp_path / "cmp" / "tokens.csv").open()))
    diffs = [float(r["logp_noisy-bf16"]) - float(r["logp_parity-bf16"]) for r in rows]
    assert np.allclose(np.abs(diffs), delta) and len(rows) == len(signs)


def test_compare_different_tokens_exits_2_naming_the_position(run_out, tmp_path, capsys):
    recs = read_rollouts(run_out / "rollouts" / "fp32" / "engine.jsonl")
    recs[1].output_ids = recs[1].output_ids[:3] + [(recs[1].output_ids[3] + 1) % 50] + recs[1].output_ids[4:]
    a, b = run_out / "rollouts" / "fp32" / "engine.jsonl", write_rollouts(tmp_path / "b.jsonl", recs)
    assert main(["diagnose", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    expected = (f"token sequences differ: record 1 (prompt_index 0, sample_index 1), output_ids position 3: "
                f"{a} has {read_rollouts(a)[1].output_ids[3]}, {b} has {recs[1].output_ids[3]}")
    assert expected in err
    assert not (tmp_path / "cmp" / "report.json").exists()


def test_compare_refuses_different_distributions(run_out, tmp_path, capsys):
    recs = read_rollouts(run_out / "rollouts" / "fp32" / "engine.jsonl")
    for r in recs:
        r.sampling_params["temperature"], r.raw_logprobs = 0.7, None
    a, b = run_out / "rollouts" / "fp32" / "hf.jsonl", write_rollouts(tmp_path / "b.jsonl", recs)
    assert main(["diagnose", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    assert "not like with like: record 0" in capsys.readouterr().err


def test_compare_malformed_jsonl_exits_2_naming_the_line(run_out, tmp_path, capsys):
    good = run_out / "rollouts" / "fp32" / "engine.jsonl"
    lines = good.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:4] + [lines[4][:-5]] + lines[5:]) + "\n")
    assert main(["diagnose", "compare", str(good), str(bad)]) == 2
    assert f"{bad}: line 5: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["diagnose"],
    ["diagnose", "run", "--n", "two"],
    ["diagnose", "compare", "only-one.jsonl"],
    ["diagnose", "compare", "a", "b", "--logprobs", "sampled"],
    ["diagnose", "nope"],
])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_bad_values_exit_2_before_any_work(tmp_path, capsys):
    assert main(["diagnose", "run", "--dtypes", "fp8", "--out", str(tmp_path)]) == 2
    assert "unknown dtype 'fp8'" in capsys.readouterr().err
    assert main(["diagnose", "run", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "not an HF model directory" in capsys.readouterr().err
    assert main(["diagnose", "compare", str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("argv, words", [
    (["diagnose"], ["run", "compare", "convert-vllm", "report.json"]),
    (["diagnose", "run"], ["--model", "--dtypes", "--prompts", "--n", "--max-tokens", "--deterministic", "--out",
                           "--device", "--wandb", "--wandb-mode", "temperature", "exit codes"]),
    (["diagnose", "compare"], ["A.jsonl", "B.jsonl", "--logprobs", "--tokenizer", "token sequences differ", "exit codes"]),
    (["diagnose", "convert-vllm"], ["--logprobs-mode", "--temperature", "exit codes"]),
])
def test_help_is_complete(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for w in words:
        assert w in text, w


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second\n")
    assert read_prompts(str(txt)) == ["first prompt", "  second"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="line 2: expected an object with a string 'prompt'"):
        read_prompts(str(jl))
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(str(tmp_path / "e.txt"))


def test_wandb_offline_run_holds_the_metrics(run_out, tmp_path):
    pytest.importorskip("wandb")
    from parity.train.tracking import read_offline_run

    a, b = run_out / "rollouts" / "bf16" / "engine.jsonl", run_out / "rollouts" / "bf16" / "hf.jsonl"
    out = tmp_path / "cmp"
    assert main(["diagnose", "compare", str(a), str(b), "--out", str(out), "--wandb"]) == 0
    (pairing,) = _pairings(out).values()
    (run_dir,) = (out / "tracking" / "wandb").glob("offline-run-*")
    summary = read_offline_run(run_dir).summary
    key = f"diagnose/compare/{pairing['rollout']}_vs_{pairing['train']}/{ABS_MEAN}"
    assert summary[key] == pytest.approx(pairing["metrics"][ABS_MEAN])
    images = {p.name.split("_0_")[0] for p in (run_dir / "files" / "media" / "images" / "plots").glob("*.png")}
    assert images == set(PLOT_FILES)
    table = json.loads(next((run_dir / "files" / "media" / "table").glob("mismatch_table_*.table.json")).read_text())
    assert table["data"][0][0] == pairing["name"]

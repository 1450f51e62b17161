"""`parity train` with a broken config file: one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import re

import pytest

from parity.cli.main import main


@pytest.mark.parametrize("text, extra, message", [
    ("steps: [1\nfoo: :\n", [], r"bad\.yaml: invalid YAML at line 2, column 4: expected ',' or '\]'"),
    ("rollout:\n\ttemperature: 1\n", [], r"bad\.yaml: invalid YAML at line 2, column 1: found character '\\t'"),
    ("stepz: 3\n", [], r"unknown config key\(s\) stepz; the top level accepts device, engine"),
    ("rollout:\n  temperatur: 1\n", [], r"unknown config key\(s\) rollout\.temperatur; rollout accepts group_size"),
    ("- 1\n- 2\n", [], r"bad\.yaml: expected a mapping at the top level"),
    ("engine:\n  max_model_len: 0\n", [], r"engine: max_model_len must be >= 1, got 0"),
    ("steps: 1\n", ["--set", "rollout.top_p=[0.9"], r"override 'rollout\.top_p=\[0\.9': invalid YAML at line 1"),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, text, extra, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--wandb-mode", "disabled", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("parity train: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # refused before any work

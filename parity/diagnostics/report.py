"""What a diagnosis leaves behind: a console table, report.json, tokens.csv and the worst tokens.

report.json  {"command", "created", "environment", "config", "notes", "files",
              "token_sets": [{label, num_samples, num_tokens, sources}],
              "pairings": [{name, token_set, rollout, train, num_tokens, metrics: {...}}],
              "worst_tokens": [{pairing, token_set, sample, position, token_id, token, context,
                                logp_rollout, logp_train, log_ratio}]}
tokens.csv   one row per output token per token set: token_set, sample, prompt_index, sample_index,
             position, token_id, token, then logp_<source> for every source (empty where a set lacks it).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.diagnostics.comparison import Pairing, TokenSet

# Columns of the console table (metric -> short header); report.json holds every metric under its full name.
TABLE_METRICS = {
    "logp_abs_diff_mean": "mean |Δ|",
    "logp_abs_diff_max": "max |Δ|",
    "mismatch_kl": "KL k1",
    "mismatch_k3_kl": "KL k3",
    "ratio_min": "ρ min",
    "ratio_max": "ρ max",
    "ratio_fraction_outside": "ρ ∉ [½,2]",
    "prob_pearson": "pearson p",
}
WORST_PER_PAIRING = 10


@dataclass
class WorstToken:
    pairing: str
    token_set: str
    sample: int
    position: int
    token_id: int
    token: str
    context: str  # decoded text around the token, the token itself in [[ ]]
    logp_rollout: float
    logp_train: float

    @property
    def log_ratio(self) -> float:
        return self.logp_train - self.logp_rollout


def _decode(tokenizer, ids: list[int]) -> str:
    if tokenizer is None:
        return " ".join(str(t) for t in ids)
    return tokenizer.decode(ids)


def _token_text(tokenizer, token_id: int) -> str:
    return f"<{token_id}>" if tokenizer is None else tokenizer.decode([token_id])


def worst_tokens(pairing: Pairing, tokens: TokenSet, tokenizer=None, k: int = WORST_PER_PAIRING,
                 left: int = 12, right: int = 4) -> list[WorstToken]:
    """The `k` tokens with the largest |log ratio|, decoded with `left` tokens before and `right` after."""
    diff = pairing.abs_diff
    order = np.argsort(-np.nan_to_num(diff, nan=np.inf), kind="stable")[:k]
    out = []
    for i in order:
        s, pos = int(pairing.sample[i]), int(pairing.position[i])
        seq = tokens.prompt_ids[s] + tokens.output_ids[s]
        at = len(tokens.prompt_ids[s]) + pos
        token = seq[at]
        context = (_decode(tokenizer, seq[max(0, at - left):at]) + "[[" + _decode(tokenizer, [token]) + "]]"
                   + _decode(tokenizer, seq[at + 1:at + 1 + right]))
        out.append(WorstToken(pairing.name, pairing.token_set, s, pos, int(token), _token_text(tokenizer, token),
                              context, float(pairing.logp_rollout[i]), float(pairing.logp_train[i])))
    return out


def table_columns(pairings: list[Pairing]) -> list[str]:
    have = set().union(*(p.metrics for p in pairings)) if pairings else set()
    return [m for m in TABLE_METRICS if m in have]


def _fmt(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.2e}" if abs(x) < 1e-2 or abs(x) >= 1e3 else f"{x:.4f}"


def metrics_table(pairings: list[Pairing], title: str):
    """A rich Table: one row per pairing, the TABLE_METRICS columns."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left", caption="ρ = π_train/π_rollout; all metrics: report.json",
                  caption_justify="left")
    table.add_column("tokens: rollout → train", style="bold", overflow="fold", min_width=16)
    table.add_column("n", justify="right", no_wrap=True)
    cols = table_columns(pairings)
    for c in cols:
        table.add_column(TABLE_METRICS[c], justify="right", no_wrap=True, min_width=8)
    for p in pairings:
        table.add_row(escape(f"{p.token_set}: {p.rollout} → {p.train}"), str(len(p.logp_rollout)),
                      *(_fmt(p.metrics[c]) for c in cols))
    return table


def worst_tokens_table(worst: list[WorstToken], title: str):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for c, j in [("sample", "right"), ("pos", "right"), ("token", "left"),
                 ("logp rollout", "right"), ("logp train", "right"), ("log ratio", "right"), ("context", "left")]:
        table.add_column(c, justify=j)
    for w in worst:
        table.add_row(str(w.sample), str(w.position), escape(repr(w.token)), f"{w.logp_rollout:.4f}",
                      f"{w.logp_train:.4f}", f"{w.log_ratio:+.2e}", escape(repr(w.context)))
    return table


def write_tokens_csv(path: Path, token_sets: list[TokenSet], tokenizer=None,
                     indices: dict[str, list[tuple[Any, Any]]] | None = None) -> Path:
    """One row per output token; `indices[label][s]` = (prompt_index, sample_index) of sample s."""
    sources: list[str] = []
    for t in token_sets:
        sources += [s for s in t.logprobs if s not in sources]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["token_set", "sample", "prompt_index", "sample_index", "position", "token_id", "token"]
                   + [f"logp_{s}" for s in sources])
        for t in token_sets:
            idx = (indices or {}).get(t.label)
            for s, out in enumerate(t.output_ids):
                pi, si = idx[s] if idx else ("", "")
                for pos, tok in enumerate(out):
                    values = [repr(t.logprobs[src][s][pos]) if src in t.logprobs else "" for src in sources]
                    w.writerow([t.label, s, "" if pi is None else pi, "" if si is None else si, pos, tok,
                                _token_text(tokenizer, tok), *values])
    return path


def _json_safe(x: Any) -> Any:
    """NaN/inf are not JSON: write them as strings so the report stays standard JSON."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def build_report(command: str, token_sets: list[TokenSet], pairings: list[Pairing], worst: list[WorstToken],
                 config: dict, environment: dict, notes: list[str], files: dict[str, str]) -> dict:
    return _json_safe({
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment,
        "config": config,
        "notes": notes,
        "files": files,
        "token_sets": [{"label": t.label, "num_samples": len(t.output_ids),
                        "num_tokens": sum(len(o) for o in t.output_ids), "sources": list(t.logprobs)}
                       for t in token_sets],
        "pairings": [{"name": p.name, "token_set": p.token_set, "rollout": p.rollout, "train": p.train,
                      "num_tokens": len(p.logp_rollout), "metrics": p.metrics} for p in pairings],
        "worst_tokens": [{**w.__dict__, "log_ratio": w.log_ratio} for w in worst],
    })


def write_report(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path

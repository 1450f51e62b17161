"""Line up logprobs from different sources over the same tokens and measure how far apart they are.

A `TokenSet` is one batch of sampled sequences with every source's per-token logprobs for them
(the engine's, an HF trainer's, a reference's). A `Pairing` names two sources of one set: the
first plays π_rollout, the second π_train, so the log-ratio is log ρ = logp_train − logp_rollout, as
verl's rollout-correction metrics and TRL's `sampling/importance_sampling_ratio` define it. The aggregate
metrics come from `parity.precision.metrics.mismatch_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from parity.diagnostics.rollout_io import LOGPROB_KINDS, RolloutRecord


class TokenMismatchError(ValueError):
    """Two rollout files do not hold the same token sequences, so their logprobs cannot be compared."""


@dataclass
class TokenSet:
    """Sampled sequences and each source's per-token logprobs of their output tokens."""

    label: str
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    logprobs: dict[str, list[list[float]]] = field(default_factory=dict)  # source -> [sample][position]

    def add(self, source: str, values: list[list[float]]) -> None:
        if len(values) != len(self.output_ids):
            raise ValueError(f"{self.label}/{source}: {len(values)} samples of logprobs for {len(self.output_ids)} samples")
        for i, (v, o) in enumerate(zip(values, self.output_ids)):
            if len(v) != len(o):
                raise ValueError(f"{self.label}/{source}: sample {i} has {len(v)} logprobs for {len(o)} output tokens")
        self.logprobs[source] = [list(map(float, v)) for v in values]


@dataclass
class Pairing:
    """Per-token arrays (flattened over samples) and aggregate metrics of `rollout` vs `train`."""

    token_set: str
    rollout: str
    train: str
    sample: np.ndarray  # [N] index of the sample in its token set
    position: np.ndarray  # [N] index of the token in its sample's output
    token_id: np.ndarray  # [N]
    logp_rollout: np.ndarray  # [N] float64
    logp_train: np.ndarray  # [N] float64
    metrics: dict[str, float]

    @property
    def name(self) -> str:
        return f"{self.token_set}: {self.rollout} vs {self.train}"

    @property
    def log_ratio(self) -> np.ndarray:
        """log ρ = logp_train − logp_rollout, per token."""
        return self.logp_train - self.logp_rollout

    @property
    def abs_diff(self) -> np.ndarray:
        return np.abs(self.log_ratio)


def compare(tokens: TokenSet, rollout: str, train: str) -> Pairing:
    """Mismatch of source `train` against source `rollout` over every output token of `tokens`."""
    from parity.precision.metrics import mismatch_metrics, pad_sequences

    for source in (rollout, train):
        if source not in tokens.logprobs:
            raise KeyError(f"{tokens.label}: no logprobs from {source!r} (have {sorted(tokens.logprobs)})")
    if not any(tokens.output_ids):
        raise ValueError(f"{tokens.label}: every sample has an empty output; there is nothing to compare")
    lp_rollout, mask = pad_sequences(tokens.logprobs[rollout])
    lp_train, _ = pad_sequences(tokens.logprobs[train])
    metrics = {k: float(v) for k, v in mismatch_metrics(lp_rollout, lp_train, mask, prefix="").items()}
    sample = np.concatenate([np.full(len(o), i) for i, o in enumerate(tokens.output_ids)])
    position = np.concatenate([np.arange(len(o)) for o in tokens.output_ids])
    return Pairing(
        token_set=tokens.label,
        rollout=rollout,
        train=train,
        sample=sample.astype(np.int64),
        position=position.astype(np.int64),
        token_id=np.concatenate([np.asarray(o, dtype=np.int64) for o in tokens.output_ids]),
        logp_rollout=lp_rollout[mask].numpy(),
        logp_train=lp_train[mask].numpy(),
        metrics=metrics,
    )


def check_same_tokens(a: list[RolloutRecord], b: list[RolloutRecord], names: tuple[str, str] = ("A", "B")) -> None:
    """Raise TokenMismatchError naming the first sequence and position where `a` and `b` differ.

    Records are matched in file order; `i` in the message counts records from 0.
    """
    na, nb = names
    if len(a) != len(b):
        raise TokenMismatchError(f"token sequences differ: {na} has {len(a)} records, {nb} has {len(b)}")
    for i, (ra, rb) in enumerate(zip(a, b)):
        for part in ("prompt_ids", "output_ids"):
            sa, sb = getattr(ra, part), getattr(rb, part)
            if sa == sb:
                continue
            pos = next((k for k, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
            got_a = sa[pos] if pos < len(sa) else "end of sequence"
            got_b = sb[pos] if pos < len(sb) else "end of sequence"
            which = "" if ra.prompt_index is None else f" (prompt_index {ra.prompt_index}, sample_index {ra.sample_index})"
            raise TokenMismatchError(
                f"token sequences differ: record {i}{which}, {part} position {pos}: {na} has {got_a}, {nb} has {got_b}"
            )


def _distribution(rec: RolloutRecord, kind: str) -> tuple | None:
    """(temperature, top_k, top_p, min_p) of the distribution `kind` logprobs are taken under; None if unknown."""
    if kind == "raw":
        return (1.0, None, 1.0, 0.0)
    sp = rec.sampling_params
    if sp.get("temperature") is None:
        return None
    top_k = sp.get("top_k") or 0
    return (float(sp["temperature"]) or 1.0, None if top_k <= 0 else int(top_k),
            float(sp.get("top_p", 1.0) or 1.0), float(sp.get("min_p", 0.0) or 0.0))


def _describe(dist: tuple) -> str:
    t, k, p, m = dist
    parts = [f"temperature {t:g}"] + ([f"top_k {k}"] if k else []) + ([f"top_p {p:g}"] if p < 1 else [])
    return ", ".join(parts + ([f"min_p {m:g}"] if m > 0 else []))


def _kind_of_file(records: list[RolloutRecord], name: str, kind: str) -> str:
    """`kind` if every record has it ("auto": the first kind every record has); else a ValueError."""
    if kind == "auto":
        kind = next((k for k in LOGPROB_KINDS if all(r.get_logprobs(k) is not None for r in records)), "")
        if not kind:
            raise ValueError(f"{name}: records mix 'logprobs' and 'raw_logprobs'; pick one with --logprobs")
    missing = next((i for i, r in enumerate(records) if r.get_logprobs(kind) is None), None)
    if missing is not None:
        field = "logprobs" if kind == "processed" else "raw_logprobs"
        raise ValueError(f"{name}: record {missing} has no '{field}' (needed for --logprobs {kind})")
    return kind


def choose_logprob_kinds(a: list[RolloutRecord], b: list[RolloutRecord], requested: str = "auto",
                         names: tuple[str, str] = ("A", "B")) -> tuple[str, str, list[str]]:
    """Which field ("processed" or "raw") to read from each file, and notes for the report.

    "auto" takes processed logprobs when both files have them, else raw when both do, else each
    file's own. The two must describe the same distribution (temperature and top-k/top-p/min-p
    from `sampling_params`; raw = temperature 1, no filters): otherwise ρ is biased (vLLM issue
    42259) and a ValueError says so. Where a file does not record its temperature, a note says
    the check could not be made.
    """
    if requested == "auto":
        shared = next((k for k in LOGPROB_KINDS if all(r.get_logprobs(k) is not None for r in a + b)), None)
        kind_a = kind_b = shared
    else:
        kind_a = kind_b = requested
    kind_a = kind_a or _kind_of_file(a, names[0], "auto")
    kind_b = kind_b or _kind_of_file(b, names[1], "auto")
    _kind_of_file(a, names[0], kind_a)
    _kind_of_file(b, names[1], kind_b)
    notes = []
    unknown = False
    for i, (ra, rb) in enumerate(zip(a, b)):
        da, db = _distribution(ra, kind_a), _distribution(rb, kind_b)
        if da is None or db is None:
            unknown = True
        elif da != db:
            raise ValueError(
                f"not like with like: record {i} of {names[0]} holds {kind_a} logprobs under {_describe(da)}, "
                f"{names[1]} holds {kind_b} logprobs under {_describe(db)}; recompute one side under the "
                "other's temperature and filters (or compare raw logprobs with --logprobs raw)"
            )
    if unknown:
        notes.append("a file does not record the sampling temperature of its processed logprobs: "
                     "could not check that both sides use the same distribution")
    return kind_a, kind_b, notes

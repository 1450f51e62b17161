"""The rollout file: JSONL, one sample per line, so any engine's or trainer's logprobs can be compared.

The format is documented in docs/rollout_format.md. `write_rollouts` / `read_rollouts` validate every
record (a bad file fails with its path and line number, never deep inside a comparison);
`records_from_rollouts` turns the engine's `Rollout`s into records; `records_from_vllm` converts
vLLM `RequestOutput`s dumped as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout

FORMAT_VERSION = 1
# A log-probability is <= 0; float rounding may push a near-certain token a hair above.
LOGPROB_MAX = 1e-3
LOGPROB_KINDS = ("processed", "raw")


class RolloutFormatError(ValueError):
    """A rollout file or record that does not follow the format; the message names file and line."""


@dataclass
class RolloutRecord:
    """One sample: the tokens and the log-probability each engine or trainer gave them.

    `logprobs[t]` is the log-probability of `output_ids[t]` under the distribution the sample was
    drawn from (after temperature, top-k, top-p, min-p, renormalised): vLLM's `processed_logprobs`.
    `raw_logprobs[t]` is the log-softmax of the unprocessed logits: vLLM's `raw_logprobs`. A record
    holds at least one of the two. With temperature 1 and no top-k/top-p/min-p they are equal.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float] | None = None
    raw_logprobs: list[float] | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)  # vLLM names: temperature, top_p, ...
    dtype: str | None = None  # compute dtype of whoever produced the logprobs: fp16, bf16, fp32
    engine: str | None = None  # "parity", "vllm", "hf-transformers", ...
    engine_version: str | None = None
    model: str | None = None
    weight_version: int | None = None
    finish_reason: str | None = None  # "stop" | "length"
    text: str | None = None
    request_id: str | None = None
    prompt_index: int | None = None
    sample_index: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form, kept as is
    format_version: int = FORMAT_VERSION

    def get_logprobs(self, kind: str) -> list[float] | None:
        """`kind` is "processed" (the `logprobs` field) or "raw" (`raw_logprobs`)."""
        if kind not in LOGPROB_KINDS:
            raise ValueError(f"unknown logprob kind {kind!r}; expected one of {LOGPROB_KINDS}")
        return self.logprobs if kind == "processed" else self.raw_logprobs

    def to_json(self) -> str:
        out = {k: v for k, v in asdict(self).items() if v is not None and v != {}}
        return json.dumps(out, ensure_ascii=False)


_FIELDS = {f.name for f in fields(RolloutRecord)}
# What a record takes from an engine's Rollout under the same name.
_FROM_ROLLOUT = ("weight_version", "finish_reason", "text", "request_id", "prompt_index", "sample_index")
_REQUIRED = ("prompt_ids", "output_ids")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_token_ids(name: str, ids: Any) -> None:
    if not isinstance(ids, list):
        raise RolloutFormatError(f"'{name}' must be a list of token ids, got {type(ids).__name__}")
    for i, t in enumerate(ids):
        if not _is_int(t) or t < 0:
            raise RolloutFormatError(f"'{name}[{i}]' must be a non-negative integer token id, got {t!r}")


def _check_logprobs(name: str, values: Any, length: int) -> None:
    if not isinstance(values, list):
        raise RolloutFormatError(f"'{name}' must be a list of floats, got {type(values).__name__}")
    if len(values) != length:
        raise RolloutFormatError(f"'{name}' has {len(values)} entries but 'output_ids' has {length}")
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise RolloutFormatError(f"'{name}[{i}]' must be a number, got {v!r}")
        if math.isnan(v) or v > LOGPROB_MAX:
            raise RolloutFormatError(f"'{name}[{i}]' = {v!r} is not a log-probability (must be <= 0, -inf allowed)")


def validate_record(rec: RolloutRecord) -> None:
    """Raise RolloutFormatError (a ValueError) naming the first problem with `rec`."""
    if rec.format_version != FORMAT_VERSION:
        raise RolloutFormatError(f"format_version {rec.format_version!r} is not supported (this parity reads {FORMAT_VERSION})")
    _check_token_ids("prompt_ids", rec.prompt_ids)
    if not rec.prompt_ids:
        raise RolloutFormatError("'prompt_ids' is empty; the first output token needs a prompt to be conditioned on")
    _check_token_ids("output_ids", rec.output_ids)
    if rec.logprobs is None and rec.raw_logprobs is None:
        raise RolloutFormatError("record has neither 'logprobs' nor 'raw_logprobs'")
    for name in ("logprobs", "raw_logprobs"):
        if getattr(rec, name) is not None:
            _check_logprobs(name, getattr(rec, name), len(rec.output_ids))
    if not isinstance(rec.sampling_params, dict):
        raise RolloutFormatError("'sampling_params' must be an object")
    temperature = rec.sampling_params.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
        raise RolloutFormatError(f"'sampling_params.temperature' must be a number >= 0, got {temperature!r}")
    if not isinstance(rec.metadata, dict):
        raise RolloutFormatError("'metadata' must be an object")
    for name in ("weight_version", "prompt_index", "sample_index"):
        value = getattr(rec, name)
        if value is not None and not _is_int(value):
            raise RolloutFormatError(f"'{name}' must be an integer, got {value!r}")


def record_from_dict(obj: Any) -> RolloutRecord:
    """Build and validate a record from one parsed JSON line."""
    if not isinstance(obj, dict):
        raise RolloutFormatError(f"a record must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise RolloutFormatError(f"unknown field(s) {', '.join(map(repr, unknown))} (put free-form data under 'metadata')")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise RolloutFormatError(f"missing required field(s) {', '.join(map(repr, missing))}")
    rec = RolloutRecord(**{k: v for k, v in obj.items() if v is not None})  # null = the default
    validate_record(rec)
    return rec


def write_rollouts(path: str | Path, records: Iterable[RolloutRecord]) -> Path:
    """Validate every record, then write them as JSONL (parent folders are created)."""
    records = list(records)
    for i, rec in enumerate(records):
        try:
            validate_record(rec)
        except RolloutFormatError as e:
            raise RolloutFormatError(f"record {i}: {e}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(rec.to_json() + "\n")
    return path


def read_rollouts(path: str | Path) -> list[RolloutRecord]:
    """Read and validate a rollout file. Blank lines are skipped; any other bad line raises
    RolloutFormatError naming the file and its 1-based line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rollout file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RolloutFormatError(f"{path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                records.append(record_from_dict(obj))
            except RolloutFormatError as e:
                raise RolloutFormatError(f"{path}: line {lineno}: {e}") from None
    if not records:
        raise RolloutFormatError(f"{path}: no records (the file is empty)")
    return records


def sampling_params_dict(params: SamplingParams) -> dict[str, Any]:
    """The vLLM-named sampling parameters stored with every record."""
    return {k: v for k, v in asdict(params).items() if k != "raw_logprobs"}


def records_from_rollouts(
    rollouts: Sequence[Rollout],
    params: SamplingParams | Sequence[SamplingParams],
    dtype: str,
    model: str | None = None,
    engine_version: str | None = None,
) -> list[RolloutRecord]:
    """Engine results -> records. `params` is one SamplingParams for all, or one per prompt index
    (as passed to `Engine.generate`); `dtype` is the engine's compute dtype name."""
    if engine_version is None:
        from parity import __version__ as engine_version
    per_prompt = isinstance(params, Sequence)
    out = []
    for r in rollouts:
        p = params[r.prompt_index] if per_prompt else params
        raw = None if r.output_raw_logprobs is None else [float(x) for x in r.output_raw_logprobs]
        out.append(RolloutRecord(
            prompt_ids=list(r.prompt_ids), output_ids=list(r.output_ids), logprobs=[float(x) for x in r.output_logprobs],
            raw_logprobs=raw, sampling_params=sampling_params_dict(p), dtype=dtype, engine="parity",
            engine_version=engine_version, model=model, **{name: getattr(r, name) for name in _FROM_ROLLOUT},
        ))
    return out


def write_engine_rollouts(path: str | Path, engine, rollouts: Sequence[Rollout],
                          params: SamplingParams | Sequence[SamplingParams], model: str | None = None) -> Path:
    """Write an `Engine`'s results, stamped with its compute dtype, to a rollout file."""
    from parity.precision.dtypes import dtype_name

    return write_rollouts(path, records_from_rollouts(rollouts, params, dtype_name(engine.model.dtype), model=model))


# ------------------------------------------------------------------------------------------ vLLM
VLLM_LOGPROBS_MODES = {"raw_logprobs": "raw", "processed_logprobs": "processed"}


def _sampled_logprob(entry: Any, token: int, where: str) -> float:
    """One position of vLLM's `logprobs`: {token_id: Logprob | {"logprob": x} | x}, or a bare float."""
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry)
    if not isinstance(entry, dict):
        raise RolloutFormatError(f"{where}: expected a dict of token id -> logprob, got {type(entry).__name__}")
    value = entry.get(str(token), entry.get(token))
    if value is None:
        raise RolloutFormatError(
            f"{where}: the sampled token {token} is not among the returned logprobs (vLLM always includes "
            "it when SamplingParams.logprobs is set; was the output truncated?)"
        )
    if isinstance(value, dict):
        value = value.get("logprob")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RolloutFormatError(f"{where}: logprob of token {token} is {value!r}, not a number")
    return float(value)


def records_from_vllm(
    outputs: Any,
    logprobs_mode: str = "raw_logprobs",
    sampling_params: dict[str, Any] | None = None,
    dtype: str | None = None,
    model: str | None = None,
) -> list[RolloutRecord]:
    """Convert vLLM `RequestOutput`s, as JSON objects (one or a list), into records.

    Each object needs `prompt_token_ids` and `outputs`, a list of {token_ids, logprobs, finish_reason,
    text, index}; `logprobs` is vLLM's list (one per output token) of {token_id: {"logprob": ...}}
    (or plain floats). `logprobs_mode` is the engine's `logprobs_mode` (vLLM default: raw_logprobs)
    and says which field the values land in. `sampling_params` (e.g. {"temperature": 1.0}) is
    stored with every record; an object's own "sampling_params" key takes precedence.
    """
    if logprobs_mode not in VLLM_LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode {logprobs_mode!r} cannot be compared as token logprobs; "
                         f"expected one of {', '.join(VLLM_LOGPROBS_MODES)}")
    kind = VLLM_LOGPROBS_MODES[logprobs_mode]
    if isinstance(outputs, dict):
        outputs = [outputs]
    if not isinstance(outputs, list):
        raise RolloutFormatError(f"expected a vLLM RequestOutput object or a list of them, got {type(outputs).__name__}")
    records = []
    for i, req in enumerate(outputs):
        where = f"request {i}"
        if not isinstance(req, dict) or "prompt_token_ids" not in req or "outputs" not in req:
            raise RolloutFormatError(f"{where}: needs 'prompt_token_ids' and 'outputs' (a vLLM RequestOutput)")
        params = dict(sampling_params or {})
        params.update(req.get("sampling_params") or {})
        for j, comp in enumerate(req["outputs"]):
            here = f"{where} output {j}"
            if not isinstance(comp, dict):
                raise RolloutFormatError(f"{here}: expected an object (a vLLM CompletionOutput)")
            token_ids = comp.get("token_ids")
            entries = comp.get("logprobs")
            if token_ids is None or entries is None:
                raise RolloutFormatError(f"{here}: needs 'token_ids' and 'logprobs' (run vLLM with SamplingParams(logprobs=0))")
            if len(entries) != len(token_ids):
                raise RolloutFormatError(f"{here}: {len(entries)} logprob entries for {len(token_ids)} tokens")
            values = [_sampled_logprob(e, t, f"{here} position {k}") for k, (e, t) in enumerate(zip(entries, token_ids))]
            rec = RolloutRecord(
                prompt_ids=list(req["prompt_token_ids"]),
                output_ids=list(token_ids),
                logprobs=values if kind == "processed" else None,
                raw_logprobs=values if kind == "raw" else None,
                sampling_params=params,
                dtype=dtype,
                engine="vllm",
                model=model,
                finish_reason=comp.get("finish_reason"),
                text=comp.get("text"),
                request_id=None if req.get("request_id") is None else str(req["request_id"]),
                prompt_index=i,
                sample_index=comp.get("index", j),
            )
            try:
                validate_record(rec)
            except RolloutFormatError as e:
                raise RolloutFormatError(f"{here}: {e}") from None
            records.append(rec)
    return records


def load_vllm_json(path: str | Path) -> Any:
    """A JSON file (one object or a list) or JSONL (one RequestOutput per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vLLM output file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    objs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                objs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RolloutFormatError(f"{path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return objs

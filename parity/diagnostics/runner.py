"""`parity diagnose run`: sample with the engine under each precision, recompute the same tokens
trainer-side, and pair the sources up.

Per dtype d the token set "d" holds the engine's samples and four sources of logprobs for them:
  engine  the engine's own logprobs (processed: under temperature T)
  hf      HF transformers in d, one full forward of prompt + response (the usual trainer)
  parity  parity's trainer-side forward on the engine's model
  fp32    HF transformers in fp32: the reference (for d = fp32 this is "hf" itself, so not repeated)
All recomputations use the same temperature T as the sampler, so like is compared with like; with
the default T = 1 (and no top-k/top-p, which diagnose never sets) processed and raw logprobs agree.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, replace

import torch

from parity.diagnostics.comparison import Pairing, TokenSet, compare
from parity.diagnostics.recompute import load_hf_model, recompute_logprobs
from parity.diagnostics.rollout_io import RolloutRecord, records_from_rollouts
from parity.engine.sampling_params import SamplingParams
from parity.models.loader import Checkpoint
from parity.precision.dtypes import dtype_name, resolve_dtype

REFERENCE_DTYPE = "fp32"
# (rollout source, train source) pairs reported for each token set, most telling first.
PAIRINGS = [("engine", "hf"), ("engine", "parity"), ("engine", "fp32"), ("hf", "fp32")]


@dataclass
class RunConfig:
    model: str
    prompts: list[str]
    dtypes: list[str] = field(default_factory=lambda: ["fp16", "bf16", "fp32"])
    n: int = 8
    max_tokens: int = 256
    temperature: float = 1.0
    seed: int = 0
    deterministic: bool = False
    device: str = "cpu"
    micro_batch: int = 8
    chat: bool = False  # wrap each prompt as a user message in the tokenizer's chat template

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts to sample from")
        if not self.dtypes:
            raise ValueError("no dtypes given")
        self.dtypes = [dtype_name(resolve_dtype(d)) for d in self.dtypes]
        if len(set(self.dtypes)) != len(self.dtypes):
            raise ValueError(f"dtype listed twice in {self.dtypes}")
        if self.n < 1 or self.max_tokens < 1 or self.micro_batch < 1:
            raise ValueError("n, max_tokens and micro_batch must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class RunResult:
    token_sets: list[TokenSet]
    pairings: list[Pairing]
    records: dict[str, list[RolloutRecord]]  # "<dtype>/<source>" -> records written under rollouts/
    environment: dict[str, str]
    tokenizer: object  # decodes token ids for the report


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _environment(device: torch.device) -> dict[str, str]:
    import transformers

    import parity

    env = {"parity": parity.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _recompute_records(base: list[RolloutRecord], values: list[list[float]], engine: str, version: str,
                       dtype: str, temperature: float) -> list[RolloutRecord]:
    """Copies of `base` carrying a trainer's recomputed logprobs, as a rollout file would store them."""
    return [replace(r, logprobs=v, raw_logprobs=None, sampling_params={"temperature": temperature}, dtype=dtype,
                    engine=engine, engine_version=version) for r, v in zip(base, values)]


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt; with `chat`, as a user turn in the tokenizer's chat template."""
    if not chat:
        return tokenizer.encode(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template, and this model's has none")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def run_diagnosis(cfg: RunConfig, log=print) -> RunResult:
    """Generate under every dtype in `cfg.dtypes`, recompute, and compare (see the module docstring)."""
    import transformers

    from parity import Engine

    checkpoint = Checkpoint.resolve(cfg.model)
    device = torch.device(cfg.device)
    params = SamplingParams(n=cfg.n, temperature=cfg.temperature, seed=cfg.seed, max_tokens=cfg.max_tokens,
                            raw_logprobs=True)
    max_positions = checkpoint.config.max_position_embeddings
    tokenizer = checkpoint.tokenizer()
    prompt_ids = [encode_prompt(tokenizer, p, cfg.chat) for p in cfg.prompts]
    max_model_len = min(max_positions, max(map(len, prompt_ids)) + cfg.max_tokens)
    token_sets: list[TokenSet] = []
    records: dict[str, list[RolloutRecord]] = {}
    for dtype in cfg.dtypes:
        log(f"[{dtype}] sampling {len(prompt_ids)} prompts x {cfg.n} with the engine")
        engine = Engine.from_pretrained(
            checkpoint.path, dtype=dtype, device=cfg.device, deterministic=cfg.deterministic, seed=cfg.seed,
            max_model_len=max_model_len, max_num_seqs=min(256, len(prompt_ids) * cfg.n),
        )
        recs = records_from_rollouts(engine.generate(prompt_ids, params), params, dtype, model=str(checkpoint.path))
        tokens = TokenSet(dtype, [r.prompt_ids for r in recs], [r.output_ids for r in recs])
        tokens.add("engine", [r.logprobs for r in recs])
        records[f"{dtype}/engine"] = recs
        log(f"[{dtype}] recomputing with parity's trainer-side forward")
        values = recompute_logprobs(engine.model, tokens.prompt_ids, tokens.output_ids, cfg.temperature,
                                    cfg.micro_batch)
        tokens.add("parity", values)
        records[f"{dtype}/parity"] = _recompute_records(recs, values, "parity-forward", recs[0].engine_version,
                                                        dtype, cfg.temperature)
        del engine
        _free_memory()
        log(f"[{dtype}] recomputing with HF transformers in {dtype}")
        hf = load_hf_model(checkpoint, dtype, device)
        values = recompute_logprobs(hf, tokens.prompt_ids, tokens.output_ids, cfg.temperature, cfg.micro_batch)
        del hf
        _free_memory()
        tokens.add("hf", values)
        records[f"{dtype}/hf"] = _recompute_records(recs, values, "hf-transformers", transformers.__version__, dtype,
                                                    cfg.temperature)
        token_sets.append(tokens)

    # The fp32 reference for the other precisions' tokens (for the fp32 set, "hf" is the reference).
    others = [t for t in token_sets if t.label != REFERENCE_DTYPE]
    if others:
        log(f"[reference] recomputing with HF transformers in {REFERENCE_DTYPE}")
        hf = load_hf_model(checkpoint, REFERENCE_DTYPE, device)
        for tokens in others:
            values = recompute_logprobs(hf, tokens.prompt_ids, tokens.output_ids, cfg.temperature, cfg.micro_batch)
            tokens.add("fp32", values)
            records[f"{tokens.label}/fp32"] = _recompute_records(
                records[f"{tokens.label}/engine"], values, "hf-transformers", transformers.__version__,
                REFERENCE_DTYPE, cfg.temperature)
        del hf
        _free_memory()

    pairings = []
    for tokens in token_sets:
        for rollout, train in PAIRINGS:
            if rollout in tokens.logprobs and train in tokens.logprobs:
                pairings.append(compare(tokens, rollout, train))
    return RunResult(token_sets, pairings, records, _environment(device), tokenizer)

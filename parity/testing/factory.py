"""Write small random-init models in real HF format, so tests and the default job load them
through exactly the path a user's checkpoint takes (config.json + safetensors + tokenizer.json).

The tokenizer is a byte-level BPE trained in-process on a built-in corpus; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Reinforcement learning from rollouts needs the trainer and the engine to agree on probabilities.",
    "What is 12 + 34? The answer is 46.",
    "Sort the list 5 3 9 1 and answer 1 3 5 9.",
    "Paged attention keeps the key value cache in fixed size blocks with a block table.",
    "Once upon a time there was a small model that learned to add numbers.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * = ?",
    "Hello world! How are you today? I am fine, thank you.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyModelSpec:
    """Shapes of a factory model. Defaults are small enough for CPU tests, but keep GQA (4 heads, 2 KV)."""

    architecture: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    vocab_size: int = 384  # BPE target size; the trained tokenizer may come out a little smaller
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    # A wide init gives peaked distributions, so greedy argmax is stable against rounding.
    initializer_range: float = 0.3
    rope_scaling: dict | None = field(default=None)
    seed: int = 0
    # Benchmark-sized models: pad the config's vocabulary past the small tokenizer's (as real checkpoints
    # pad theirs), initialise on `init_device`, and save in `save_dtype`.
    padded_vocab_size: int | None = None
    init_device: str = "cpu"
    save_dtype: str = "float32"


def train_tokenizer(vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


# TinyModelSpec field -> the HF config key it sets.
_HF_CONFIG_NAMES = {
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings", "tie_word_embeddings": "tie_word_embeddings",
    "initializer_range": "initializer_range",
}


def _hf_config(spec: TinyModelSpec, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = {hf_name: getattr(spec, name) for name, hf_name in _HF_CONFIG_NAMES.items()}
    common.update(vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=None, pad_token_id=eos_id, rms_norm_eps=1e-6)
    if spec.head_dim is not None:
        common["head_dim"] = spec.head_dim
    if spec.architecture == "llama":
        rope = spec.rope_scaling or {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(rope_scaling=rope, **common)
    if spec.architecture == "qwen2":
        return Qwen2Config(**common)
    if spec.architecture == "qwen3":
        return Qwen3Config(attention_bias=False, **common)
    raise ValueError(f"unknown factory architecture {spec.architecture!r}; choose from {ARCHITECTURES}")


def write_tiny_model(path: str | Path, spec: TinyModelSpec | None = None, max_shard_size: str | None = None) -> Path:
    """Create a random-init HF model directory at `path` and return it.

    `max_shard_size` (e.g. "200KB") writes sharded safetensors with an index file.
    """
    from transformers import AutoModelForCausalLM

    spec = spec or TinyModelSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = _hf_config(spec, max(len(tokenizer), spec.padded_vocab_size or 0), eos_id)
    torch.manual_seed(spec.seed)
    with torch.device(spec.init_device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.save_dtype))
    with torch.no_grad():  # make norm weights and biases non-trivial so their code paths matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def default_model_dir() -> Path:
    """The built-in default model (a tiny Llama), written once to a cache folder."""
    from parity.models.aliases import cache_root

    path = cache_root() / "tiny-llama"
    if not (path / "config.json").is_file():
        write_tiny_model(path)
    return path

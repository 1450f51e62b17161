"""GGUF files of factory models, written the way llama.cpp's converter writes them, for the loader's tests.

Not a test module (pytest collects test_*.py only); test modules import it as `from gguf_writer import write_gguf`
(pytest puts tests/ on sys.path, as for tests/spawn_ranks.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_gguf(model_dir: Path, path: Path, rope_freqs: np.ndarray | None = None) -> Path:
    """An F32 GGUF of a factory model written the way llama.cpp's converter does (gguf-py names, Llama's
    q/k rows permuted for its rotary layout, tokenizer + chat template in the metadata)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from parity.models.rope import rope_parameters
    from parity.testing.factory import SPECIAL_TOKENS

    cfg, tok = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    arch, head_dim = cfg.model_type, cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_parameters(cfg)["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), cfg.num_hidden_layers)
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        stem, suffix = name.rsplit(".", 1)
        a = t.float().numpy()
        if arch == "llama" and suffix == "weight" and stem.endswith(("q_proj", "k_proj")):
            n = cfg.num_attention_heads if stem.endswith("q_proj") else cfg.num_key_value_heads
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)  # llama.cpp's permute
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", np.ascontiguousarray(a))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

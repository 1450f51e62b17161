"""Model code and checkpoints: config, the decoder, RoPE, HF-name weight mapping, loading (safetensors, GGUF), aliases."""

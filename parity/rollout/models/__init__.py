"""Model definitions, HF config parsing, weight loading and the test-model factory."""

"""Decoding mechanics shared by several methods (KV cache, sampling, verification, n-grams)."""

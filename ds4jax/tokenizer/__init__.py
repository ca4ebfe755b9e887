"""The ds4 byte-level BPE tokenizer and chat format (built from GGUF metadata)."""

from ds4jax.tokenizer.tokenizer import Tokenizer, TokenizerError

__all__ = ["Tokenizer", "TokenizerError"]

"""Generation over any `Backend`: sampling methods, the Generator loop, chat sessions.

    from ds4jax import build
    from ds4jax.generate import Generator, SamplingParams
    gen = Generator(build.local_backend(path), Tokenizer.from_gguf(path))
    gen.generate("Hi", max_new_tokens=16, sampling=SamplingParams(temperature=0.7, seed=1))

`LocalBackend` imports JAX, so it is loaded on first use; the rest is numpy only.
"""

from ds4jax.generate.loop import ChatSession, GenerationResult, Generator, TextStream
from ds4jax.runtime.sampling import (Greedy, SamplingMethod, SamplingParams, Temperature, TopK,
                                      TopP, sample_token, top_logprobs)
from ds4jax.runtime.types import Backend, HopTelemetry, StepResult


def __getattr__(name):
  if name == "LocalBackend":
    from ds4jax.runtime.local import LocalBackend
    return LocalBackend
  raise AttributeError(f"module 'ds4jax.generate' has no attribute {name!r}")


__all__ = [
    "Backend", "ChatSession", "GenerationResult", "Generator", "Greedy", "HopTelemetry",
    "LocalBackend", "SamplingMethod", "SamplingParams", "StepResult", "Temperature",
    "TextStream", "TopK", "TopP", "sample_token", "top_logprobs",
]

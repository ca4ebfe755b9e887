"""Look inside DeepSeek V4 from a notebook, wherever its layers run (issue 22; design.md §14).

A `Lab` wraps any `Backend`: one process, an in-process split (`LocalBackend` with several
ranges) or a `Coordinator` with workers on other hosts. Each stage captures the points of
the layers it owns, and only the saved arrays travel back.

    from ds4jax import research
    lab = research.Lab.open("model.gguf", ranges=("0:1", "2:output"))
    with lab.trace("The cat sat on the") as t:
      lens = t.layers.all.lens.save()          # float32 [L, T, V]
      ids = t.layers[2].router_ids.save()      # int32 [T, k]
    lens.value[:, -1].argmax(-1)               # each layer's guess for the next token

    cap = lab.capture("The cat", "ffn_out,router_ids", layers="1:2")   # a Captured
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ds4jax.config import POINTS
from ds4jax.research.trace import Layer, Layers, Point, Saved, Trace
from ds4jax.runtime.capture import (DEFAULT_MAX_BYTES, Captured, CaptureError, CaptureSpec,
                                    StepCapture)
from ds4jax.runtime.sampling import SamplingParams


class Lab:
  """Traces and captures over `backend` (any `runtime.types.Backend`); `tokenizer` turns
  text prompts into ids (without one, prompts are token ids)."""

  def __init__(self, backend, tokenizer=None):
    self.backend, self.tokenizer = backend, tokenizer
    self.cfg = backend.cfg

  @classmethod
  def open(cls, path: str | os.PathLike, *, ranges: Sequence[str] = ("all",),
           ctx_size: int = 4096, **kw) -> "Lab":
    """A Lab over a `LocalBackend` of a GGUF (or checkpoint directory), one process or an
    in-process split (`ranges`), with its tokenizer; `kw`: more `build.local_backend`
    arguments (prefill_chunk, max_sessions, dtype, ...)."""
    from ds4jax import build
    from ds4jax.runtime import sources
    backend = build.local_backend(os.fspath(path), ranges=ranges, ctx_size=ctx_size, **kw)
    return cls(backend, sources.open_tokenizer(os.fspath(path)))

  def close(self) -> None:
    self.backend.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def tokens(self, prompt: str | Sequence[int], *, chat: bool = False,
             system: str | None = None, thinking: bool = False) -> list[int]:
    """A prompt's ids: token ids as given, or text (BOS + text, or the chat format)."""
    if not isinstance(prompt, str):
      return [int(t) for t in prompt]
    if self.tokenizer is None:
      raise ValueError("this Lab has no tokenizer: give the prompt as token ids")
    return self.generator().prompt_ids(prompt, chat=chat, system=system, thinking=thinking)

  def generator(self):
    from ds4jax.generate.loop import Generator
    if self.tokenizer is None:
      raise ValueError("generation needs a tokenizer (its EOS): give the Lab one")
    return Generator(self.backend, self.tokenizer)

  def trace(self, prompt: str | Sequence[int], *, positions: str | Sequence[int] = "all",
            max_bytes: int = DEFAULT_MAX_BYTES, chat: bool = False) -> Trace:
    """A trace of the prompt's prefill (a fresh session); save points inside `with`."""
    return Trace(self, self.tokens(prompt, chat=chat), positions=positions, max_bytes=max_bytes)

  def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 16,
               sampling=None, positions: str | Sequence[int] = "all",
               max_bytes: int = DEFAULT_MAX_BYTES, chat: bool = False,
               **gen: Any) -> Trace:
    """A traced generation: rows cover the prompt, then each sampled token fed back.
    `gen`: more `Generator.generate` arguments (stop, stop_tokens, ...)."""
    gen = dict(gen, max_new_tokens=max_new_tokens, sampling=sampling)
    return Trace(self, self.tokens(prompt, chat=chat), positions=positions, max_bytes=max_bytes,
                 generate=gen)

  def capture(self, prompt: str | Sequence[int], points: str | Sequence[str],
              layers: str | Sequence[int] = "all", *, positions: str | Sequence[int] = "all",
              max_bytes: int = DEFAULT_MAX_BYTES) -> Captured:
    """Every point of `points` at every layer of `layers` for the prompt's prefill."""
    spec = CaptureSpec.parse(points, layers, positions, max_bytes)
    sid = self.backend.new_session()
    try:
      return self.backend.step(sid, self.tokens(prompt), SamplingParams(), 0,
                               capture=spec).captured
    finally:
      self.backend.close_session(sid)


__all__ = ["Captured", "CaptureError", "CaptureSpec", "Lab", "Layer", "Layers", "POINTS",
           "Point", "Saved", "StepCapture", "Trace"]

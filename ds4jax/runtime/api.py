"""Notebook API: `Model` with `logits(ids)` and `session()`, over a StageRunner.

`ds4jax.load_model(path)` (`ds4jax.runtime.sources.load_model`: a GGUF or a checkpoint directory)
and `Model.from_source(source)` (a `quant.source.TensorSource`, or a GGUF path) build one.

    model = ds4jax.load_model("tiny.gguf")
    logits_TV = model.logits([0, 5, 7])        # one-shot prefill from position 0
    s = model.session()
    s.prefill([0, 5, 7])                       # [3, V]
    s.decode(9)                                # [V]
    s.rewind(2)                                # keep the first 2 tokens
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ds4jax.runtime.load import as_source, load_stage
from ds4jax.runtime.runner import StageRunner


class Model:
  """A whole model (or any slice) behind a StageRunner. `cfg`, `layers`, `runner`."""

  def __init__(self, runner: StageRunner):
    self.runner = runner
    self.cfg, self.layers = runner.cfg, runner.layers
    self._scratch = None

  @classmethod
  def from_source(cls, source, layers: str | None = "all", *, dtype=None, ctx_size: int = 4096,
                  max_chunk: int = 256, weights: str = "packed", devices=1,
                  activations: str = "exact") -> "Model":
    """Loads `layers` of a source (a `TensorSource`, or a GGUF file path).

    dtype: compute dtype ('float32' | 'bfloat16'); None is the source's (float32 for a
    GGUF). weights: 'packed' (default: quantised tensors stay GGUF blocks in device memory,
    dequantised inside the step) or 'dequantized' (dequantised to `dtype` at load, ~13x the
    GGUF bytes for a q2 file in f32). ctx_size is capped at the model's context length.
    devices: 1, N, "all" or a Mesh: the routed experts sharded over that many local devices
    (`model.sharding`). activations: 'exact' (default) or 'q8' (`runtime.load.load_stage`).
    """
    source = as_source(source)
    stage = load_stage(source, layers, dtype=dtype, weights=weights, devices=devices,
                       activations=activations)
    ctx = min(int(ctx_size), int(stage.cfg.context_length))
    return cls(StageRunner(stage, ctx_size=ctx, max_chunk=max_chunk,
                           fingerprint=source.fingerprint))

  def _check_full(self) -> None:
    if not (self.layers.embeds and self.layers.has_output):
      raise ValueError(f"layer slice {self.layers} has no embedding or no head: use "
                       "runtime.runner.forward to pass HC states between slices")

  def logits(self, token_ids: Sequence[int]) -> np.ndarray:
    """One-shot prefill from position 0: float32 [T, V]."""
    self._check_full()
    state = self._scratch if self._scratch is not None else self.runner.init_state()
    self._scratch = None  # donated below; a failure must not leave a dead buffer behind
    state = self.runner.truncate(state, 0)
    out, self._scratch = self.runner.forward(state, np.asarray(token_ids), None, 0)
    return out

  def session(self) -> "Session":
    self._check_full()
    return Session(self.runner)


class Session:
  """Incremental prefill/decode over one decode state; `pos` tokens are held."""

  def __init__(self, runner: StageRunner):
    self.runner = runner
    self.state = runner.init_state()
    self.pos = 0

  def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
    """Appends tokens; returns their logits float32 [T, V]."""
    ids = np.asarray(token_ids)
    out, self.state = self.runner.forward(self.state, ids, None, self.pos)
    self.pos += int(ids.shape[0])
    return out

  def decode(self, token_id: int) -> np.ndarray:
    """Appends one token; returns its logits float32 [V]."""
    return self.prefill(np.asarray([int(token_id)]))[0]

  def rewind(self, pos: int) -> None:
    """Forgets every token at or after `pos` (cheap: counters only)."""
    self.state = self.runner.truncate(self.state, int(pos))
    self.pos = int(pos)

  def reset(self) -> None:
    self.rewind(0)

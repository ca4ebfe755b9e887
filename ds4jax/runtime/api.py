"""Notebook API: `Model` with `logits(ids)` and `session()`, over a StageRunner.

`ds4jax.load_model(path)` (`ds4jax.build.load_model`: a GGUF, a checkpoint directory or a
`quant.source.TensorSource`) builds one.

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

from ds4jax.runtime.runner import StageRunner


class Model:
  """A whole model (or any slice) behind a StageRunner. `cfg`, `layers`, `runner`."""

  def __init__(self, runner: StageRunner):
    self.runner = runner
    self.cfg, self.layers = runner.cfg, runner.layers
    self._scratch = None

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

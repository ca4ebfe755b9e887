"""`LocalBackend`: the single-process executor of the `Backend` protocol (design.md §5).

It drives one `StageRunner` for the whole model, or a chain of in-process runners for
contiguous layer ranges (an in-process split, handy in notebooks: same numbers as the wire
split minus the wire). It is a `RouteBackend` whose route has local hops only: the step is
`runtime.step.run_step`, the same algorithm the coordinator runs. Each session holds a slot
in every stage's pool of states (`runtime.batching.StageBatcher`) and the token ids that
state holds, so a `step` with a longer transcript computes only the new suffix, and a
transcript that diverges rewinds to the common prefix instead of starting again from 0.

Steps of different sessions run concurrently (one thread per session: the server's request
threads, `step_many`): their decode tokens run as one batched call at every stage, and an
in-process split pipelines (one session on stage 2 while another is on stage 1).

    backend = ds4jax.build.local_backend("tiny.gguf", ctx_size=512)   # the one builder
    sid = backend.new_session()
    res = backend.step(sid, [0, 17, 42], SamplingParams(), step=0)
    res.token, res.n_computed     # sampled id, 3 tokens computed
"""

from __future__ import annotations

import logging
from typing import Sequence

from ds4jax.config import LayerRange
from ds4jax.runtime.backend import RouteBackend
from ds4jax.runtime.session import SessionError
from ds4jax.runtime.step import StepRequest, common_prefix

log = logging.getLogger("ds4jax.generate")


class LocalBackend(RouteBackend):
  """Runs the whole model in this process over one or more contiguous `StageRunner`s.

  Args:
    runners: one runner for `all`, or runners for contiguous ranges, the first embedding and
      the last owning the head.
    prefill_chunk: most tokens per forward call while prefilling.
    max_sessions: sessions whose KV state stays allocated; the least recently used one beyond
      that drops its state (and re-prefills if used again).
    progress_every_s: period of the "prefill i/n tokens" log line on long prompts.
  """

  def __init__(self, runners, *, prefill_chunk: int = 256, max_sessions: int = 8,
               progress_every_s: float = 2.0, max_batch: int | None = None):
    if not isinstance(runners, (list, tuple)):
      runners = [runners]
    if not runners:
      raise ValueError("LocalBackend needs at least one StageRunner")
    check_chain([r.layers for r in runners], runners[0].cfg.n_layers)
    if prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    super().__init__(runners, prefill_chunk=min(prefill_chunk, *(r.max_chunk for r in runners)),
                     max_sessions=max_sessions, max_batch=max_batch,
                     progress_every_s=progress_every_s)


def check_chain(ranges: Sequence[LayerRange], n_layers: int) -> None:
  """Refuses runners that do not cover [0, n_layers) contiguously, embed first, head last."""
  expect = 0
  for k, r in enumerate(ranges):
    if r.start != expect:
      raise ValueError(f"stage {k} starts at layer {r.start}, expected {expect}")
    if r.has_output != (k == len(ranges) - 1):
      raise ValueError(f"only the last stage may own the output head (stage {k}: {r})")
    expect = r.end + 1
  if expect != n_layers:
    raise ValueError(f"the stages end at layer {expect - 1}, the model has {n_layers} layers")


__all__ = ["LocalBackend", "SessionError", "StepRequest", "check_chain", "common_prefix"]

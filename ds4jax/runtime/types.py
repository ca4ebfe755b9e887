"""The backend interface shared by the local and the split executors (design.md §5).

`runtime.local.LocalBackend` (one process) and `bridge.coordinator.Coordinator` (a route of
workers) both implement `Backend`, so `generate.loop.Generator` and every script run unchanged
whether the model is local or split.

    backend.step(sid, transcript, sampling, step) -> StepResult

`transcript` is the whole token history of the session so far. The backend reuses the longest
common prefix with what the session already holds, rewinds on divergence, prefills the new
suffix in chunks and samples the next token on the stage that owns the head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ds4jax.runtime.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class HopTelemetry:
  """What one stage (hop) of the route spent on one `step`.

  `compute_s` is the stage's own forward time, `queue_s` the time the request waited before
  compute started (0 for an in-process stage), `bytes_in`/`bytes_out` what crossed the wire to
  and from that stage (0 locally), `n_tokens` the tokens it computed.
  """

  stage: str  # the layer range, e.g. "0:1" or "2:output"
  host: str  # "local" for an in-process stage, else "HOST:PORT" of the worker
  compute_s: float = 0.0
  queue_s: float = 0.0
  bytes_in: int = 0
  bytes_out: int = 0
  n_tokens: int = 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StepResult:
  """One sampled token plus what it cost.

  `logprobs` holds the `top_logprobs` most likely (id, logprob) pairs, best first, empty when
  not requested. `logits_V` is the float32 logits row [V] the token was sampled from, only with
  `return_logits=True`. `n_computed` is how many transcript tokens the backend had to run
  through the model (the rest came from the reused prefix).
  """

  token: int
  logprobs: list[tuple[int, float]]
  logits_V: np.ndarray | None
  telemetry: list[HopTelemetry]
  n_computed: int


@runtime_checkable
class Backend(Protocol):
  """An executor of the whole model over per-session state: `runtime.local.LocalBackend` (one
  process) and `bridge.coordinator.Coordinator` (a split route) implement all of it, so no
  caller needs to probe for a method (both are `runtime.backend.RouteBackend`s).

  `route_info()` returns at least: ready (bool), reason (str, '' when ready), n_layers,
  ctx_size, route / stages (one {layers, host} per stage, in order), missing_layers (the
  layer indices no ready stage serves).
  """

  cfg: Any  # the ModelConfig
  ctx_size: int
  # The backend logs prefill progress itself (the Generator adds no heartbeat of its own).
  reports_prefill_progress: bool

  @property
  def fingerprint(self) -> str | None:
    ...

  def new_session(self, activation_dtype: str | None = None) -> str:
    ...

  def close_session(self, sid: str) -> None:
    ...

  def session_tokens(self, sid: str) -> list[int]:
    ...

  def step(self, sid: str, transcript: Sequence[int], sampling: SamplingParams, step: int, *,
           top_logprobs: int = 0, return_logits: bool = False) -> StepResult:
    ...

  def step_many(self, requests: Sequence[Any]) -> list[StepResult | BaseException]:
    ...

  def route_ready(self) -> tuple[bool, str]:
    ...

  def wait_route(self, timeout: float | None = None) -> Any:
    """Returns once the route is complete; RouteUnavailable after timeout."""

  def route_info(self) -> dict:
    ...

  def export_session(self, sid: str) -> tuple[list[int], dict]:
    """(tokens, {layer: checkpoints.stage_state.LayerBlob}) of the session's whole state."""

  def import_session(self, sid: str, tokens: Sequence[int], read: Any) -> None:
    """Installs the state of `tokens` (read(layers) -> {layer: LayerBlob}) into sid."""

  def warmup(self, batch_sizes: Sequence[int] = (1,), chunk_sizes: Sequence[int] = (1,)) -> None:
    ...

  def close(self) -> None:
    ...


__all__ = ["HopTelemetry", "StepResult", "Backend"]

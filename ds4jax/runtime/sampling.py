"""Sampling methods: small frozen dataclasses with one method.

Every method maps a logits row to a token id, deterministically from `(seed, step)`, so the
stage that owns the head can sample with the coordinator's parameters and get exactly the
token a single process would get. Sampling runs in numpy (float64) on one row: it is a few
microseconds next to the model, and it is bit-identical on every host.

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    token = params.sample(logits_V, step=3)
"""

from __future__ import annotations

import abc
import dataclasses
import json
from typing import Any

import numpy as np


class SamplingMethod(abc.ABC):
  """Maps one logits row [V] to a token id: by default, as its wire form (`to_params`)."""

  def get_next_token(self, logits_V: np.ndarray, step: int) -> int:
    return self.to_params().sample(logits_V, step)

  @abc.abstractmethod
  def to_params(self) -> "SamplingParams":
    ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams(SamplingMethod):
  """The wire form of every sampling method (JSON-serialisable, hashable).

  temperature 0 means greedy (argmax, ties to the lowest id). top_k 0 and top_p 1.0 disable
  those filters.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if int(self.seed) != self.seed or not 0 <= self.seed < 2**63:
      raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def to_params(self) -> "SamplingParams":
    return self

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown sampling fields: {sorted(unknown)}")
    return cls(**d)

  def get_next_token(self, logits_V: np.ndarray, step: int) -> int:
    return sample_token(logits_V, self, step)

  def sample(self, logits_V: np.ndarray, step: int) -> int:
    return sample_token(logits_V, self, step)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Greedy(SamplingMethod):
  """Argmax, ties to the lowest token id."""

  def get_next_token(self, logits_V, step):
    return int(np.argmax(logits_V))

  def to_params(self):
    return SamplingParams()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Seeded(SamplingMethod):
  """Sampling at `temperature`, seeded per step, through the filter a subclass adds."""

  temperature: float = 1.0
  seed: int = 0

  def to_params(self):
    return SamplingParams(temperature=self.temperature, seed=self.seed, **self._filter())

  def _filter(self) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Temperature(_Seeded):
  """Every token, at `temperature`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(_Seeded):
  """The `k` most likely tokens, at `temperature`."""

  k: int = 40

  def _filter(self):
    return {"top_k": self.k}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopP(_Seeded):
  """The most likely tokens whose probabilities sum to `p`, at `temperature`."""

  p: float = 0.9

  def _filter(self):
    return {"top_p": self.p}


def step_rng(seed: int, step: int) -> np.random.Generator:
  """The per-step generator: the same (seed, step) gives the same draw on every host."""
  return np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), step & (2**64 - 1)]))


def sample_token(logits_V: np.ndarray, params: SamplingParams, step: int) -> int:
  """Samples one token id from a logits row [V]."""
  logits_V = np.asarray(logits_V)
  if logits_V.ndim != 1:
    raise ValueError(f"expected a logits row [V], got shape {logits_V.shape}")
  if params.greedy:
    return int(np.argmax(logits_V))
  z_V = logits_V.astype(np.float64) / params.temperature
  if params.top_k and params.top_k < z_V.shape[0]:
    # Keep exactly top_k ids; among equal logits the lower id wins (stable sort).
    order = np.argsort(-z_V, kind="stable")
    mask = np.full(z_V.shape, -np.inf)
    mask[order[: params.top_k]] = 0.0
    z_V = z_V + mask
  z_V = z_V - np.max(z_V)
  p_V = np.exp(z_V)
  p_V /= p_V.sum()
  if params.top_p < 1.0:
    order = np.argsort(-p_V, kind="stable")
    cum = np.cumsum(p_V[order])
    keep = int(np.searchsorted(cum, params.top_p, side="left")) + 1
    kept = np.zeros_like(p_V)
    kept[order[:keep]] = p_V[order[:keep]]
    p_V = kept / kept.sum()
  u = step_rng(params.seed, step).random()
  cdf = np.cumsum(p_V)
  return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), p_V.shape[0] - 1))


def log_softmax(logits_V: np.ndarray) -> np.ndarray:
  z = np.asarray(logits_V, np.float64)
  z = z - z.max()
  return z - np.log(np.exp(z).sum())


def top_logprobs(logits_V: np.ndarray, k: int) -> list[tuple[int, float]]:
  """The k most likely ids with their log-probabilities, best first (ties: lower id)."""
  lp = log_softmax(logits_V)
  order = np.argsort(-lp, kind="stable")[:k]
  return [(int(i), float(lp[i])) for i in order]

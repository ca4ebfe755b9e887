"""What the bridge fuzz tests share: the fake model's split, a `fake_bridge` fixture that
builds coordinators and workers of it and stops them all at the end, and the exactness check
that follows every fuzz run.

Test modules import the fixture by name (`from fuzz_setup import fake_bridge`)."""

import pytest

from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.config import LayerRange
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner
from ds4jax.testing.fuzzing import greedy_next, start_fake_worker

CFG = FakeConfig()
CTX = 64
LOCAL = LayerRange(0, 1, False)  # the coordinator's slice
REMOTE = LayerRange(2, 3, True)  # the worker's slice, with the head
RSS_BOUND = 96 * 2**20  # what a whole fuzz run may add to this process's RSS
# A hang guard, not a goal: how long a fuzz case may take to end (the peer answers or hangs
# up). The deadlines under test are a second or less; how long each case took is printed.
HANG_S = 60.0


class FakeBridge:
  """Coordinators (over LOCAL) and workers (over REMOTE) of the fake model for one test."""

  def __init__(self):
    self.coordinators, self.workers = [], []

  def coordinator(self, **opts) -> Coordinator:
    coord = Coordinator(FakeRunner(CFG, LOCAL, ctx_size=CTX), CoordinatorOptions(**opts))
    self.coordinators.append(coord)
    return coord

  def worker(self, addr, **opts):
    """A worker thread dialling `addr`: (worker, thread)."""
    w, t = start_fake_worker(addr, CFG, REMOTE, CTX, **opts)
    self.workers.append((w, t))
    return w, t

  def close(self):
    for w, _ in self.workers:
      w.stop()
    for coord in self.coordinators:
      coord.close()
    for _, t in self.workers:
      t.join(10)


@pytest.fixture
def fake_bridge():
  bridge = FakeBridge()
  yield bridge
  bridge.close()


def assert_continues_exactly(coord, sid: str, tokens: list[int], n: int = 3) -> list[int]:
  """`n` greedy steps of session `sid` from `tokens` equal the one-process reference;
  returns the extended token list."""
  tokens = list(tokens)
  for _ in range(n):
    res = coord.step(sid, tokens, SamplingParams(), len(tokens))
    assert res.token == greedy_next(CFG, tokens)
    tokens.append(res.token)
  return tokens

"""The worker session store: prefix check before compute, rewind, LRU eviction."""

import pytest

from ds4jax.bridge import protocol
from ds4jax.bridge.errors import PrefixMismatch
from ds4jax.bridge.sessions import SessionStore
from ds4jax.config import LayerRange
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner

INIT = protocol.FNV_INIT


def _run(store, runner, sid, pos0, toks, hash_before):
  s, evicted = store.prepare(sid, pos0, hash_before, runner)
  out, state = runner.forward(s.state, toks, None, pos0)
  store.commit(s, toks, state)
  return out, evicted


def test_prefix_checked_and_rewind():
  runner = FakeRunner(FakeConfig(), LayerRange(0, 3, True), 32)
  st = SessionStore(4)
  a, _ = _run(st, runner, "s", 0, [1, 2, 3, 4], INIT)
  with pytest.raises(PrefixMismatch, match="holds 4 positions"):
    st.prepare("s", 5, INIT, runner)
  with pytest.raises(PrefixMismatch, match="prefix hash at position 2"):
    st.prepare("s", 2, protocol.fnv1a64([1, 9]), runner)
  with pytest.raises(PrefixMismatch, match="unknown here"):
    st.prepare("other", 3, protocol.fnv1a64([1, 2, 3]), runner)
  # Rewind to 2 and diverge: same logits as computing [1, 2, 7, 8] from scratch.
  b, _ = _run(st, runner, "s", 2, [7, 8], protocol.fnv1a64([1, 2]))
  ref, _ = runner.forward(runner.init_state(), [1, 2, 7, 8], None, 0)
  assert (b == ref[2:]).all() and not (b == a[2:]).all()


def test_lru_eviction():
  runner = FakeRunner(FakeConfig(), LayerRange(0, 3, True), 8)
  st = SessionStore(2)
  _run(st, runner, "a", 0, [1], INIT)
  _run(st, runner, "b", 0, [1], INIT)
  _run(st, runner, "a", 1, [2], protocol.fnv1a64([1]))  # touch a: b is now least recent
  _, evicted = _run(st, runner, "c", 0, [1], INIT)
  assert evicted == ["b"] and "a" in st and "b" not in st and len(st) == 2

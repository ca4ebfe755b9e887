"""The balanced layer planner is optimal (checked against brute force) and well-formed."""

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from ds4jax.config import LayerRange
from ds4jax.partition.plan import plan_ranges, stage_bytes


def _brute(layer_bytes, k, embed, head):
  n = len(layer_bytes)
  best = None
  for cuts in itertools.combinations(range(1, n), k - 1):
    bounds = (0, *cuts, n)
    ranges = [LayerRange(bounds[i], bounds[i + 1] - 1, i == k - 1) for i in range(k)]
    cost = max(stage_bytes(ranges, layer_bytes, embed_bytes=embed, head_bytes=head))
    best = cost if best is None else min(best, cost)
  return best


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=9), st.integers(1, 9),
       st.integers(0, 150), st.integers(0, 150))
def test_optimal_and_contiguous(layer_bytes, k, embed, head):
  k = min(k, len(layer_bytes))
  ranges = plan_ranges(layer_bytes, k, embed_bytes=embed, head_bytes=head)
  assert len(ranges) == k
  assert ranges[0].start == 0 and ranges[-1].end == len(layer_bytes) - 1
  assert [r.has_output for r in ranges] == [False] * (k - 1) + [True]
  for a, b in zip(ranges, ranges[1:]):
    assert b.start == a.end + 1 and a.end >= a.start
  got = max(stage_bytes(ranges, layer_bytes, embed_bytes=embed, head_bytes=head))
  assert got == _brute(layer_bytes, k, embed, head)


def test_flash_like_golden():
  # Flash-like: 2 small SWA layers, then alternating CSA (bigger) / HCA.
  layer_bytes = [10, 10] + [14 if il % 2 == 0 else 12 for il in range(2, 43)]
  ranges = plan_ranges(layer_bytes, 3, embed_bytes=5, head_bytes=5)
  assert [str(r) for r in ranges] == ["0:14", "15:28", "29:output"]
  assert stage_bytes(ranges, layer_bytes, embed_bytes=5, head_bytes=5) == [195, 182, 187]
  assert _brute(layer_bytes, 3, 5, 5) == 195


def test_errors():
  with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
    plan_ranges([1, 2], 3)
  with pytest.raises(ValueError, match="n_stages must be >= 1"):
    plan_ranges([1, 2], 0)
  with pytest.raises(ValueError, match="non-negative"):
    plan_ranges([1, -2], 1)

"""The contiguous route planner (bridge/route.py)."""

from ds4jax.bridge.coordinator.route import HopInfo, plan_route
from ds4jax.config import LayerRange


def H(wid, spec, n=8):
  return HopInfo(wid, LayerRange.parse(spec, n))


def test_single_process_and_chain():
  assert plan_route(8, LayerRange(0, 7, True), []) == ([], "")
  r, why = plan_route(8, LayerRange(0, 2), [H(1, "3:5"), H(2, "6:output")])
  assert [h.wid for h in r] == [1, 2] and why == ""


def test_missing_layer_names_the_first_gap():
  r, why = plan_route(8, LayerRange(0, 2), [H(1, "3:4"), H(2, "6:output")])
  assert r is None and why == "missing layer 5"
  r, why = plan_route(8, LayerRange(0, 2), [])
  assert why == "missing layer 3"
  r, why = plan_route(8, LayerRange(0, 2), [H(1, "3:7")])  # reaches the end without the head
  assert r is None and "output head" in why


def test_backtracks_spares_and_pins():
  hops = [H(1, "3:4"), H(2, "3:5"), H(3, "6:output"), H(4, "3:5")]
  r, _ = plan_route(8, LayerRange(0, 2), hops)  # 3:4 leads nowhere: backtrack to 3:5
  assert [h.wid for h in r] == [2, 3]
  r, _ = plan_route(8, LayerRange(0, 2), hops[1:][::-1])  # the spare (4) waits
  assert [h.wid for h in r] == [2, 3]
  r, _ = plan_route(8, LayerRange(0, 2), hops + [H(5, "3:output")], pin=["3:4", "3:output"])
  assert [h.wid for h in r] == [5]  # a pinned range that cannot complete is skipped
  r, why = plan_route(8, LayerRange(0, 2), hops, pin=["3:4", "5:output"])
  assert r is None and why == "missing layer 5"
  r, _ = plan_route(8, LayerRange(0, 2), hops + [H(5, "3:output")])
  assert [h.wid for h in r] == [2, 3]

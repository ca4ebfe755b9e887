"""The capture fields of WORK and RESULT (docs/protocol.md §11), without a model: the named
array codec, a worker's checks of a `cap` field, and the coordinator's plan per hop."""

import types

import numpy as np
import pytest

from ds4jax.bridge.worker import capture
from ds4jax.config import LayerRange, ModelConfig
from ds4jax.runtime.capture import CaptureError, CaptureSpec, StepCapture
from ds4jax.wire import headers, tensors
from ds4jax.wire.errors import ProtocolError

CFG = ModelConfig.tiny()  # 4 layers, C = 4, D = 256, V = 512, k = 2, E = 8
HC = 4 * CFG.n_hc * CFG.d_model  # bytes of one hc_out row


def worker(spec: str):
  return types.SimpleNamespace(layers=LayerRange.parse(spec, 4),
                               runner=types.SimpleNamespace(cfg=CFG))


def test_named_arrays_round_trip_and_reject_garbage():
  arrays = [("ffn_out.2", np.arange(6, dtype=np.float32).reshape(3, 2)),
            ("router_ids.2", np.array([[1, 5]], np.float32))]
  descs, data = tensors.encode_named(arrays)
  assert descs == [["ffn_out.2", [3, 2]], ["router_ids.2", [1, 2]]] and len(data) == 32
  got = tensors.decode_named(descs, data)
  for name, x in arrays:
    np.testing.assert_array_equal(got[name], x)
  for bad_descs, bad_data, msg in [
      (descs, data + b"\0" * 4, "payload bytes follow"),
      (descs, data[:-4], "runs past the payload"),
      ([["a", [2]], ["a", [2]]], b"\0" * 16, "bad captured array descriptor"),
      ({"a": [1]}, b"", "must be a list"),
      ([["a", [-1]]], b"", "bad tensor shape")]:
    with pytest.raises(ProtocolError, match=msg):
      tensors.decode_named(bad_descs, bad_data)


def test_cap_rides_in_the_binary_headers_json_tail():
  h = {"req": 1, "sid": "s", "p": 0, "n": 3, "hb": "0" * 16, "ha": "1" * 16, "L": "1:1",
       "cap": {"n": ["ffn_out.1"], "r": [2]}}
  assert headers.work_from_bin(headers.work_to_bin(h)) == h
  r = {"req": 1, "sid": "s", "ha": "1" * 16, "kind": "ack", "cap": [["ffn_out.1", [1, 256]]]}
  assert headers.result_from_bin(headers.result_to_bin(r)) == r


def test_worker_parses_what_the_coordinator_plans():
  """The plan of each hop of 0:0 | 1:1 | 2:output (lens of layers 1 and 3, ffn_out of 1,
  logits, the last two positions of a 3-token chunk) parses on that hop."""
  cap = StepCapture(CaptureSpec.of_keys(["ffn_out.1", "lens.1", "lens.3", "logits"],
                                        positions=[1, 2]), CFG)
  assert cap.begin(0, 3) == 0
  assert cap.want(LayerRange.parse("0:0", 4)) == frozenset()
  assert cap.want(LayerRange.parse("1:1", 4)) == {("ffn_out", 1), ("hc_out", 1)}
  req, extra = cap.remote_request(LayerRange.parse("1:1", 4), 0, 3)
  assert req == {"n": ["ffn_out.1", "hc_out.1"], "r": [1, 2]} and extra == b""
  w = capture.parse(worker("1:1"), {"cap": req}, 3, b"")
  assert w.want == {("ffn_out", 1), ("hc_out", 1)} and w.rows.tolist() == [1, 2]
  # the hop's hc_out rows come back, and go on to the head's hop as lens inputs
  cap.store(0, 3, {"ffn_out.1": np.ones((2, 256), np.float32),
                   "hc_out.1": np.full((2, 4, 256), 2.0, np.float32)})
  req, extra = cap.remote_request(LayerRange.parse("2:output", 4), 0, 3)
  assert req == {"n": ["lens.1", "lens.3", "logits"], "r": [1, 2], "li": [1]}
  assert len(extra) == 2 * HC
  w = capture.parse(worker("2:output"), {"cap": req}, 3, extra)
  assert w.want == {("hc_out", 3)} and list(w.lens_in) == [1]
  np.testing.assert_array_equal(w.lens_in[1], np.full((2, 4, 256), 2.0))
  # a chunk without an asked position asks nothing
  assert cap.remote_request(LayerRange.parse("1:1", 4), 0, 1) == (None, b"")


@pytest.mark.parametrize("spec, cap, extra, msg", [
    ("1:1", {"n": ["ffn_out.2"]}, b"", "layer 2 is not in this stage's range"),
    ("1:1", {"n": ["lens.1"]}, b"", "has no output head"),
    ("1:1", {"n": ["logits"]}, b"", "has no output head"),
    ("1:1", {"n": ["bogus.1"]}, b"", "bad capture name"),
    ("1:1", {"n": ["ffn_out.1", "ffn_out.1"]}, b"", "without repeats"),
    ("1:1", {"n": ["ffn_out.1"], "r": [2, 1]}, b"", "must ascend"),
    ("1:1", {"n": ["ffn_out.1"], "r": [3]}, b"", "must ascend within"),
    ("2:output", {"n": ["lens.0"]}, b"", "neither this stage's nor a lens input"),
    ("2:output", {"n": ["lens.1"], "li": [1]}, b"\0" * 8, "lens inputs need"),
    ("2:output", {"n": ["logits"], "li": [1]}, b"", "lens inputs must be earlier layers"),
    ("1:1", {"n": []}, b"", "non-empty"),
])
def test_worker_refuses_a_bad_cap_before_compute(spec, cap, extra, msg):
  with pytest.raises(ProtocolError, match=msg):
    capture.parse(worker(spec), {"cap": cap}, 3, extra)


def test_trailing_bytes_without_cap_are_refused():
  with pytest.raises(ProtocolError, match="follow the activations"):
    capture.parse(worker("1:1"), {}, 3, b"\0")
  assert capture.parse(worker("1:1"), {}, 3, b"") is None


@pytest.mark.parametrize("args, msg", [
    (("ffn_out", "1", "all", 0), "max_bytes must be >= 1"),
    (("ffn_out", "2:1"), "layer range '2:1' is empty"),
    (("ffn_out", "a,b"), "bad layer list"),
    (("ffn_out", "all", "x"), "bad position list"),
    (("",), "unknown capture point ''"),
])
def test_spec_parse_errors_are_one_line(args, msg):
  with pytest.raises(CaptureError, match=msg) as e:
    CaptureSpec.parse(*args)
  assert "\n" not in str(e.value)


def test_byte_limit_counts_the_positions_the_step_computes():
  spec = CaptureSpec.parse("hc_out", "0:1", max_bytes=3 * 2 * 4 * 256 * 4)
  StepCapture(spec, CFG).begin(5, 8)  # 3 positions x 2 layers of [C, D] f32: at the limit
  with pytest.raises(CaptureError, match="needs 32768 bytes, over the limit of 24576"):
    StepCapture(spec, CFG).begin(4, 8)
  StepCapture(CaptureSpec.parse("hc_out", "0:1", "last", max_bytes=8192), CFG).begin(0, 8)


def test_a_route_with_a_worker_that_cannot_capture_refuses_before_compute():
  from ds4jax.bridge.coordinator.remote import RemoteHops
  new = types.SimpleNamespace(hello={"caps": ["sample", "capture"]})
  old = types.SimpleNamespace(hello={"caps": ["sample"]})  # a worker before capture
  hops = RemoteHops([new, old], vocab_size=512, window=2, event=print)
  cap = StepCapture(CaptureSpec.parse("ffn_out"), CFG)
  with pytest.raises(CaptureError, match="cannot capture"):
    hops.check_capture(cap)
  RemoteHops([new], vocab_size=512, window=2, event=print).check_capture(cap)

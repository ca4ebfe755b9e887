"""The interventions of WORK (docs/protocol.md §12), without a model: the coordinator sends a
hop the edits of its layers in full until it has answered one, then the key only; the worker
checks them before compute, keeps them on the session, and answers a key it does not hold
with a PrefixMismatch (the coordinator sends them again)."""

import types

import numpy as np
import pytest

from ds4jax.bridge.coordinator.remote import RemoteHops, edits_field
from ds4jax.bridge.worker import edits as work_edits
from ds4jax.bridge.worker.sessions import Session
from ds4jax.config import LayerRange, ModelConfig
from ds4jax.runtime.edits import Edit, EditError, Interventions
from ds4jax.runtime.session import RouteSession
from ds4jax.wire import headers
from ds4jax.wire.errors import PrefixMismatch, ProtocolError

CFG = ModelConfig.tiny()  # 4 layers, C = 4, D = 256, E = 8, layer 0 hash-routed
D = CFG.d_model


def _worker(spec: str):
  dropped = []
  return types.SimpleNamespace(layers=LayerRange.parse(spec, 4),
                               runner=types.SimpleNamespace(cfg=CFG), dropped=dropped,
                               sessions=types.SimpleNamespace(drop=dropped.append))


def _hop(spec: str, wid: int, caps=("capture", "edits")):
  return types.SimpleNamespace(layers=LayerRange.parse(spec, 4), wid=wid,
                               hello={"caps": list(caps)})


EDITS = Interventions([
    Edit("project", "ffn_out", 0, np.ones(D, np.float32), 2.0),
    Edit("set", "attn_out", 2, np.arange(2 * D, dtype=np.float32).reshape(2, D),
         positions=(3, 9)),
    Edit("scale", "hc_out", 2, scale=0.5),
    Edit("add", "router_select", 3, np.eye(8, dtype=np.float32)[5], 1e6),
]).resolve(CFG)


def test_a_hop_gets_its_layers_edits_in_full_then_by_key():
  sess = RouteSession("s")
  sess.edits = EDITS
  hop = _hop("2:output", wid=7)
  assert edits_field(sess, _hop("1:1", wid=6)) is None  # no edit names layer 1
  ed, data = edits_field(sess, hop)
  assert ed["k"] == EDITS.key and [e[:3] for e in ed["e"]] == [
      ["set", "attn_out", 2], ["scale", "hc_out", 2], ["add", "router_select", 3]]
  assert len(data) == (2 * D + 8) * 4  # the set rows and the expert vector, nothing else
  h = {"req": 1, "sid": "s", "p": 0, "n": 3, "hb": "0" * 16, "ha": "1" * 16, "L": "2:output",
       "ed": ed}
  assert headers.work_from_bin(headers.work_to_bin(h)) == h  # it rides in the JSON tail
  tail = b"activations"
  got, rest = work_edits.parse(_worker("2:output"), {"ed": ed}, tail + data)
  assert bytes(rest) == tail and got.key == EDITS.key
  cut = got.edits.for_chunk(LayerRange.parse("2:output", 4), 8, 4)  # positions 8..11
  want = EDITS.for_chunk(LayerRange.parse("2:output", 4), 8, 4)
  assert cut.keys() == want.keys() and len(cut) == 3
  np.testing.assert_array_equal(cut[("set", "attn_out", 2)][0], want[("set", "attn_out", 2)][0])
  sess.hop_edits[7] = EDITS.key  # the hop answered a WORK that carried them
  assert edits_field(sess, hop) == ({"k": EDITS.key}, b"")
  sess.reset()
  assert sess.hop_edits == {}


def test_the_session_keeps_its_edits_and_an_unknown_key_is_a_prefix_mismatch():
  w = _worker("2:output")
  s = Session("s", 0)
  full, _ = work_edits.parse(w, {"ed": {"k": "abc", "e": [["scale", "hc_out", 2, 0.5, None,
                                                              None]], "v": []}}, b"")
  work_edits.bind(w, s, full)
  assert s.edits_key == "abc" and s.edits.layers == {2}
  key_only, _ = work_edits.parse(w, {"ed": {"k": "abc"}}, b"")
  work_edits.bind(w, s, key_only)
  assert s.edits is full.edits
  work_edits.bind(w, s, None)  # a WORK without edits: the session computes plain
  assert s.edits is None and s.edits_key is None
  with pytest.raises(PrefixMismatch, match="does not hold the edits"):
    work_edits.bind(w, s, key_only)
  assert w.dropped == ["s"]


@pytest.mark.parametrize("ed, data, msg", [
    ({"k": ""}, b"", "edits key must be"),
    ({"k": "a", "v": []}, b"", "edit values without edits"),
    ({"k": "a", "e": [["scale", "hc_out", 1, 0.5, None, None]], "v": []}, b"",
     "outside this stage's range 2:output"),
    ({"k": "a", "e": [["scale", "nope", 2, 0.5, None, None]], "v": []}, b"",
     "bad edits: cannot edit 'nope'"),
    ({"k": "a", "e": [["add", "ffn_out", 2, 1.0, None, 0]], "v": [["0", [3]]]}, b"\0" * 12,
     r"bad edits: add ffn_out.2: the value must be finite float32 \(256,\)"),
    ({"k": "a", "e": [["add", "ffn_out", 2, 1.0, None, 1]], "v": [["0", [256]]]},
     b"\0" * 1024, "edit value 1 is missing"),
    ({"k": "a", "e": [["add", "ffn_out", 2, 1.0, None, 0]], "v": [["0", [256]]]}, b"\0" * 8,
     "edit values need 1024 bytes"),
    ({"k": "a", "e": [["add", "ffn_out", "2", 1.0, None, 0]], "v": [["0", [256]]]},
     b"\0" * 1024, "malformed edit"),
    ({"k": "a", "e": "scale", "v": []}, b"", "field 'e'"),
])
def test_a_bad_ed_field_is_refused_before_compute(ed, data, msg):
  with pytest.raises(ProtocolError, match=msg):
    work_edits.parse(_worker("2:output"), {"ed": ed}, data)


def test_a_route_with_a_worker_that_cannot_edit_refuses_before_compute():
  old = _hop("2:output", wid=2, caps=("capture",))  # a worker before interventions
  hops = RemoteHops([_hop("1:1", wid=1), old], vocab_size=512, window=2, event=print)
  with pytest.raises(EditError, match="cannot take interventions"):
    hops.check_edits(EDITS)
  only_1 = Interventions([Edit("scale", "ffn_out", 1, scale=0.0)]).resolve(CFG)
  hops.check_edits(only_1)  # the old worker's layers are not edited: fine

"""Every capture point against HF DeepseekV4ForCausalLM forward hooks at the same places
(issue 22), on the re-randomised tiny oracle (hf_reference.py): a 20-token prompt, then
three greedy tokens fed back, captured through a LocalBackend on every layer.

HF places: attn_out = `self_attn` output, ffn_out = `mlp` output, hc_out = the decoder
layer's output, router_* = the `mlp.gate` outputs (scores = `gate.score_fn(logits)`), lens =
`lm_head(norm(hc_head(hc_out)))`, logits = the model's.
"""

import numpy as np
import pytest

from ds4jax.config import POINTS
from ds4jax.research import Lab

REL = 1e-3
N_PROMPT, N_NEW = 20, 4  # rows: the prompt and 3 fed-back tokens


@pytest.fixture(scope="module")
def ours(hf_tiny):
  """(token ids of every captured row, the Captured of all points on all layers)."""
  ids = np.random.default_rng(3).integers(0, 320, N_PROMPT).tolist()
  with Lab.open(hf_tiny[1], ctx_size=64, prefill_chunk=32, max_sessions=1) as lab:
    with lab.generate(ids, max_new_tokens=N_NEW) as g:
      saved = {p: getattr(g.layers.all, p).save() for p in POINTS if p != "logits"}
      saved["logits"] = g.logits.save()
  rows = ids + g.result.tokens[:-1]
  return rows, g.captured, saved


@pytest.fixture(scope="module")
def hf(hf_tiny, ours):
  import torch
  model = hf_tiny[0]
  rec, hooks = {}, []

  def keep(key, x):  # returns None: a forward hook's return value would replace the output
    rec[key] = x.detach().float().numpy()

  def router(il):
    def hook(m, a, o):  # (logits, weights, indices), rows flattened
      keep(f"router_scores.{il}", m.score_fn(o[0]))
      keep(f"router_weights.{il}", o[1])
      keep(f"router_ids.{il}", o[2])
    return hook

  for il, layer in enumerate(model.model.layers):
    hooks += [
        layer.self_attn.register_forward_hook(
            lambda m, a, o, il=il: keep(f"attn_out.{il}", o[0][0])),
        layer.mlp.register_forward_hook(lambda m, a, o, il=il: keep(f"ffn_out.{il}", o[0])),
        layer.register_forward_hook(lambda m, a, o, il=il: keep(f"hc_out.{il}", o[0])),
        layer.mlp.gate.register_forward_hook(router(il)),
    ]
  try:
    with torch.no_grad():
      rec["logits"] = model(torch.as_tensor([ours[0]])).logits[0].float().numpy()
      for il in range(len(model.model.layers)):
        hc = torch.as_tensor(rec[f"hc_out.{il}"])[None]
        rec[f"lens.{il}"] = model.lm_head(model.model.norm(model.model.hc_head(hc)))[0].numpy()
  finally:
    for h in hooks:
      h.remove()
  return rec


def _rel(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("point", ["attn_out", "ffn_out", "hc_out", "router_scores", "lens"])
def test_point_matches_hf(ours, hf, point):
  _, cap, _ = ours
  for il in range(4):
    key = f"{point}.{il}"
    assert cap[key].shape == hf[key].shape, key
    assert _rel(cap[key], hf[key]) <= REL, f"{key}: rel err {_rel(cap[key], hf[key]):.3g}"


def test_router_ids_and_weights_match_hf(ours, hf):
  """The same expert set per row (HF's top-k is unsorted), and the same weight per expert."""
  _, cap, _ = ours
  for il in range(4):
    ids, hf_ids = cap[f"router_ids.{il}"], hf[f"router_ids.{il}"].astype(np.int64)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(hf_ids, -1), err_msg=f"layer {il}")
    w = np.take_along_axis(cap[f"router_weights.{il}"], np.argsort(ids, -1), -1)
    hf_w = np.take_along_axis(hf[f"router_weights.{il}"], np.argsort(hf_ids, -1), -1)
    assert _rel(w, hf_w) <= REL, f"layer {il}"


def test_logits_and_lens_of_the_last_layer(ours, hf):
  rows, cap, saved = ours
  assert cap.positions.tolist() == list(range(len(rows)))
  assert _rel(cap["logits"], hf["logits"]) <= REL
  np.testing.assert_array_equal(cap["lens.3"], cap["logits"])  # the same head on hc_out.3
  # the trace API stacks layers: [L, R, ...]
  assert saved["lens"].value.shape == (4, len(rows), 320)
  np.testing.assert_array_equal(saved["router_ids"].value[2], cap["router_ids.2"])

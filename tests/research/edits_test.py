"""Interventions in the step (issue 22 items 3, 4 and 7; runtime/edits.py): each op does what
it says at the point it names, ds4's directional steering reads its file format, sessions
with different edits share a batched call and each equals its result alone, an in-process
split equals one process, and bad requests are one-line errors before any compute."""

import numpy as np
import pytest

from ds4jax import build
from ds4jax.runtime.capture import CaptureSpec
from ds4jax.runtime.edits import Edit, EditError, Interventions
from ds4jax.runtime.local import StepRequest
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.suite import CHUNK, CTX

SHAPES = dict(ctx_size=CTX, prefill_chunk=CHUNK)  # the suite's: programs other tests compiled
PROMPT = [1, 17, 42, 9, 250, 31, 7, 5, 77, 12]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def whole(tiny_gguf):
  be = build.local_backend(tiny_gguf, **SHAPES)
  yield be
  be.close()


@pytest.fixture(scope="module")
def direction(whole):
  d = np.random.default_rng(0).standard_normal(whole.cfg.d_model).astype(np.float32)
  return d / np.linalg.norm(d)


@pytest.fixture(scope="module")
def steer(whole, direction):
  """Steering on every layer's ffn_out (one program for the tests that share it)."""
  return Interventions([Edit("project", "ffn_out", il, direction, 2.0)
                        for il in range(whole.cfg.n_layers)])


def _step(be, edits=None, capture=None, transcript=PROMPT):
  sid = be.new_session()
  try:
    return be.step(sid, transcript, GREEDY, 0, return_logits=True, capture=capture,
                   edits=edits)
  finally:
    be.close_session(sid)


def test_each_op_does_what_it_says_at_its_point(whole, direction):
  """All four ops on one point, in their order (set, scale, add, project); the values are
  program inputs, so a second set of values (zero, amplify) runs the same program."""
  cap = CaptureSpec.parse("ffn_out,attn_out", layers="2")
  plain = _step(whole, capture=cap).captured
  f, a = plain["ffn_out.2"], plain["attn_out.2"]
  v = np.linspace(-1, 1, whole.cfg.d_model, dtype=np.float32)
  at = np.isin(np.arange(len(PROMPT)), [3, 7])[:, None]
  patched = np.where(at, np.array([v if i == 3 else -v for i in range(len(PROMPT))]), f)

  def project(y, s):
    return y - s * np.outer(y @ direction, direction)

  for scale, add_s, proj_s in ((0.5, 2.0, 1.0), (0.0, 1.0, -2.0)):
    edits = Interventions([
        Edit("set", "ffn_out", 2, np.stack([v, -v]), positions=(3, 7)),
        Edit("scale", "ffn_out", 2, scale=scale),
        Edit("add", "ffn_out", 2, v, add_s),
        Edit("project", "ffn_out", 2, 3 * direction, proj_s)])  # normalised by the edit
    got = _step(whole, edits, cap).captured
    want = project(scale * patched + add_s * v, proj_s)
    np.testing.assert_allclose(got["ffn_out.2"], want, atol=2e-5, err_msg=str(scale))
    # attn_out of the same layer comes first: the edit cannot reach it.
    np.testing.assert_array_equal(got["attn_out.2"], a)


def test_ds4_steering_file_projects_every_layers_ffn_out(whole, tmp_path):
  cfg = whole.cfg
  dirs = np.random.default_rng(1).standard_normal((cfg.n_layers, cfg.d_model))
  dirs = (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).astype("<f4")
  path = tmp_path / "dir.f32"
  dirs.tofile(path)
  steer = Interventions.ds4_steering(path, cfg, ffn=1.0)
  got = _step(whole, steer, CaptureSpec.parse("ffn_out", layers="all")).captured
  for il in range(cfg.n_layers):  # the direction is gone from every layer's ffn_out
    assert np.abs(got[f"ffn_out.{il}"] @ dirs[il]).max() < 1e-4
  assert {e.point for e in steer.edits} == {"ffn_out"}
  both = Interventions.ds4_steering(path, cfg, ffn=1.0, attn=0.5)
  assert {e.point for e in both.edits} == {"ffn_out", "attn_out"}
  # A file of another model's size is refused with what this model needs.
  dirs[:-1].tofile(tmp_path / "short.f32")
  with pytest.raises(EditError, match=rf"needs L x D = {cfg.n_layers} x {cfg.d_model} float32"):
    Interventions.ds4_steering(tmp_path / "short.f32", cfg)


def test_mixed_edits_in_one_batch_each_equal_alone(whole, steer):
  """Two sessions, one steered and one plain, decode together (step_many): each token
  sequence equals the same session run alone."""
  edits = [steer, None]
  alone = []
  for e in edits:
    sid, toks = whole.new_session(), list(PROMPT)
    for k in range(6):
      toks.append(whole.step(sid, toks, GREEDY, k, edits=e).token)
    whole.close_session(sid)
    alone.append(toks)
  assert alone[0] != alone[1], "the steering should change the greedy text"
  sids, seqs = [whole.new_session() for _ in edits], [list(PROMPT) for _ in edits]
  for k in range(6):
    res = whole.step_many([StepRequest(s, t, GREEDY, k, edits=e)
                           for s, t, e in zip(sids, seqs, edits)])
    for t, r in zip(seqs, res):
      t.append(r.token)
  for s in sids:
    whole.close_session(s)
  assert seqs == alone


def test_changed_edits_recompute_the_session(whole, steer):
  sid = whole.new_session()
  try:
    plain = whole.step(sid, PROMPT, GREEDY, 0, return_logits=True)
    steered = whole.step(sid, PROMPT, GREEDY, 0, return_logits=True, edits=steer)
    assert steered.n_computed == len(PROMPT)  # not the cached plain prefix
    fresh = _step(whole, steer)
    np.testing.assert_array_equal(steered.logits_V, fresh.logits_V)
    again = whole.step(sid, PROMPT, GREEDY, 0, return_logits=True)
    np.testing.assert_array_equal(again.logits_V, plain.logits_V)
  finally:
    whole.close_session(sid)


def test_a_split_in_process_steers_as_one_process(tiny_gguf, whole, steer):
  split = build.local_backend(tiny_gguf, ranges=("0:1", "2:output"), **SHAPES)
  try:
    a, b = _step(whole, steer), _step(split, steer)
  finally:
    split.close()
  assert a.token == b.token
  np.testing.assert_allclose(a.logits_V, b.logits_V, atol=1e-5)


@pytest.mark.parametrize("edit, match", [
    (Edit("scale", "lens", 1, scale=0.0), "cannot edit 'lens'"),
    (Edit("rotate", "ffn_out", 1), "unknown edit 'rotate'"),
    (Edit("scale", "ffn_out", 99, scale=0.0), "edit layer 99 is outside"),
    (Edit("add", "ffn_out", 1, np.zeros(3, np.float32)), r"must be finite float32 \(256,\)"),
    (Edit("set", "ffn_out", 1, np.zeros((2, 256), np.float32), positions=(4,)),
     r"1 positions need a value of shape \(1, 256\)"),
    (Edit("project", "ffn_out", 1, np.zeros(256, np.float32)), "direction is zero"),
])
def test_bad_edits_are_one_line_errors_and_the_session_survives(whole, edit, match):
  sid = whole.new_session()
  try:
    before = whole.step(sid, PROMPT, GREEDY, 0, return_logits=True)
    with pytest.raises(EditError, match=match) as e:
      whole.step(sid, PROMPT + [before.token], GREEDY, 1, edits=Interventions([edit]))
    assert "\n" not in str(e.value)
    after = whole.step(sid, PROMPT + [before.token], GREEDY, 1)
    assert after.n_computed == 1  # the session kept its state
  finally:
    whole.close_session(sid)


def test_a_lab_trace_edits_and_patches_like_nnsight(tiny_gguf, whole):
  """Activation patching through the notebook API: ffn_out of layer 1 from prompt A
  replaces prompt B's at the first 4 positions; an ablation reads back as zeros."""
  from ds4jax.research import Lab
  lab = Lab(whole, None)
  a, b = PROMPT, [3, 14, 15, 92, 65, 35, 89, 79]
  with lab.trace(a) as ta:
    src = ta.layers[1].ffn_out.save()
  with lab.trace(b) as tb:
    tb.layers[1].ffn_out.set(src.value[:4], positions=range(4))
    tb.layers[2].attn_out.zero()
    patched, ablated = tb.layers[1].ffn_out.save(), tb.layers[2].attn_out.save()
  with lab.trace(b) as tc:
    plain = tc.layers[1].ffn_out.save()
  np.testing.assert_array_equal(patched.value[:4], src.value[:4])
  np.testing.assert_allclose(patched.value[4:], plain.value[4:], atol=1e-5)  # only those rows
  assert not np.any(ablated.value)
  with pytest.raises(ValueError, match="logits cannot be edited"):
    with lab.trace(b) as td:
      td.logits.zero()


def test_experts_forced_banned_and_ds4_expert_maps(whole, tmp_path):
  """Expert steering on a routed layer: a forced expert is on every row, a banned one on
  none; ds4's L x E map (its margin rule, times its scale) reads its file format; forcing on
  a hash layer and files of the wrong size are one-line errors."""
  cfg = whole.cfg
  il = cfg.n_hash_layers  # the first top-k layer
  cap = CaptureSpec.parse("router_ids", layers=str(il))
  plain = _step(whole, capture=cap).captured[f"router_ids.{il}"]
  common = int(np.bincount(plain.ravel(), minlength=cfg.n_experts).argmax())
  rare = int(np.bincount(plain.ravel(), minlength=cfg.n_experts).argmin())
  forced = _step(whole, Interventions.experts(il, cfg, force=[rare]), cap).captured
  assert all(rare in row for row in forced[f"router_ids.{il}"].tolist())
  banned = _step(whole, Interventions.experts(il, cfg, ban=[common]), cap).captured
  assert common not in banned[f"router_ids.{il}"]
  # ds4's map by its margin rule: at ds4's default scale (0.01) a promoted expert is chosen on
  # every row and a suppressed one on none; on a hash layer the table still chooses, and a
  # suppressed expert it picks gets weight 0.
  hash_ids = _step(whole, capture=CaptureSpec.parse("router_ids", layers="0")).captured[
      "router_ids.0"]
  e0 = int(hash_ids[0, 0])
  m = np.zeros((cfg.n_layers, cfg.n_experts), "<f4")
  m[il, rare], m[il, common], m[0, e0] = 1.0, -1.0, -1.0
  m.tofile(tmp_path / "experts.f32")
  steer = Interventions.ds4_expert_steering(tmp_path / "experts.f32", cfg)
  got = _step(whole, steer, CaptureSpec.parse("router_ids,router_weights",
                                              layers=f"0,{il}")).captured
  assert all(rare in row and common not in row for row in got[f"router_ids.{il}"].tolist())
  ids0, w0 = got["router_ids.0"], got["router_weights.0"]
  np.testing.assert_array_equal(ids0, hash_ids)
  assert np.all(w0[ids0 == e0] == 0) and np.all(w0[ids0 != e0] > 0)
  with pytest.raises(EditError, match="routes by token hash"):
    Interventions.experts(0, cfg, ban=[1])
  m[:-1].tofile(tmp_path / "short.f32")
  with pytest.raises(EditError, match=rf"L x E = {cfg.n_layers} x {cfg.n_experts} float32"):
    Interventions.ds4_expert_steering(tmp_path / "short.f32", cfg)

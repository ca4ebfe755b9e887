"""Steered logits against HF DeepseekV4ForCausalLM with the same edit hooked in (issue 22
acceptance): ds4's directional steering (y <- y - s d (d . y)) on `mlp` outputs (ffn_out)
and a `self_attn` output (attn_out), an ablation and an added vector, on the tiny oracle."""

import numpy as np
import pytest

from ds4jax import build
from ds4jax.runtime.capture import CaptureSpec
from ds4jax.runtime.edits import Edit, Interventions
from ds4jax.runtime.sampling import SamplingParams

REL = 1e-3


def _dirs(n, d, seed):
  x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def backend(hf_tiny):
  be = build.local_backend(hf_tiny[1], ctx_size=64, prefill_chunk=32, max_sessions=1)
  yield be
  be.close()


def _hf_logits(model, ids, edits):
  """HF's logits with forward hooks that edit the same outputs (a hook's return value
  replaces the module's output)."""
  import torch
  hooks = []

  def hook_for(e):
    def f(m, a, o):
      out = o[0] if isinstance(o, tuple) else o  # self_attn: (output, weights)
      if e.op == "project":
        d = torch.as_tensor(e.value / np.linalg.norm(e.value))
        out = out - e.scale * d * (out * d).sum(-1, keepdim=True)
      elif e.op == "scale":
        out = out * e.scale
      elif e.op == "add":
        out = out + e.scale * torch.as_tensor(e.value)
      return (out,) + tuple(o[1:]) if isinstance(o, tuple) else out
    return f

  for e in edits:
    layer = model.model.layers[e.layer]
    mod = layer.mlp if e.point == "ffn_out" else layer.self_attn
    hooks.append(mod.register_forward_hook(hook_for(e)))
  try:
    with torch.no_grad():
      return model(torch.as_tensor([ids])).logits[0].float().numpy()
  finally:
    for h in hooks:
      h.remove()


@pytest.mark.parametrize("case", ["steer_ffn", "steer_both", "ablate_attn", "add_ffn"])
def test_steered_logits_match_hf_with_the_same_hook(hf_tiny, backend, case):
  model, _ = hf_tiny
  cfg = backend.cfg
  dirs = _dirs(cfg.n_layers, cfg.d_model, 7)
  edits = {
      "steer_ffn": [Edit("project", "ffn_out", il, dirs[il], 1.0) for il in range(4)],
      "steer_both": [Edit("project", "ffn_out", il, dirs[il], -1.5) for il in range(4)]
                    + [Edit("project", "attn_out", 1, dirs[0], 0.75)],
      "ablate_attn": [Edit("scale", "attn_out", 2, scale=0.0)],
      "add_ffn": [Edit("add", "ffn_out", 3, dirs[3], 4.0)],
  }[case]
  ids = np.random.default_rng(5).integers(0, 320, 20).tolist()
  sid = backend.new_session()
  try:
    got = backend.step(sid, ids, SamplingParams(), 0, edits=Interventions(edits),
                       capture=CaptureSpec.of_keys(["logits"])).captured["logits"]
  finally:
    backend.close_session(sid)
  want = _hf_logits(model, ids, edits)
  plain = _hf_logits(model, ids, [])
  assert np.abs(want - plain).max() > 1e-3, "the edit should change HF's logits"
  rel = float(np.abs(got - want).max() / np.abs(want).max())
  print(f"{case}: max rel err vs HF {rel:.2g}")
  assert rel <= REL, f"{case}: rel err {rel:.3g}"

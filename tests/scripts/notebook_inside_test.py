"""Notebook 03 (inside the docs model, through an in-process split: logit lens, routing,
a steering direction, activation patching) runs top to bottom in a fresh kernel (a file of
its own, so the suite's test processes can run the notebooks at once)."""

import re

import numpy as np
import pytest

from notebook_test import execute

pytestmark = pytest.mark.e2e


def test_inside_notebook_runs(tmp_path, monkeypatch, tiny_cache_dir):
  nb, outputs = execute("03_inside_the_model.ipynb", tmp_path, monkeypatch, tiny_cache_dir)
  assert "route: 0:1@local -> 2:output@local" in outputs
  # 1. The last layer's lens is the logits (the same head on the same rows).
  (n_pos, same, dmax), = re.findall(
      r"lens top-1 == logits top-1 at all (\d+) positions: (\w+) \(max \|lens - logits\| = "
      r"([-+.\de]+)\)", outputs)
  assert int(n_pos) >= 8 and same == "True" and float(dmax) <= 1e-5, (n_pos, same, dmax)
  (ranks,), = [re.findall(r"rank in the lens of layers 0..3: \[([\d, ]+)\]", outputs)]
  assert int(ranks.split(",")[-1]) == 0, ranks

  # 2. Routing: every layer's counts over 8 experts sum to tokens x K (K = 2).
  rows = re.findall(r"^\s+(\d) (hash|learned)\s+((?:\d+\s+){8})(\d+)  = (\d+) x (\d+)$",
                    outputs, re.M)
  assert [(int(r[0]), r[1]) for r in rows] == [(0, "hash"), (1, "learned"), (2, "learned"),
                                              (3, "learned")], rows
  for _, _, counts, total, n_tok, k in rows:
    assert sum(map(int, counts.split())) == int(total) == int(n_tok) * int(k) and int(k) == 2
  # Hash routing: a repeated token id meets the same experts at layer 0, every time.
  varied = {int(il): (int(a), int(b)) for il, a, b in re.findall(
      r"^layer (\d): (\d+)/(\d+) repeated token ids met different experts", outputs, re.M)}
  assert set(varied) == {0, 1, 2, 3} and varied[0][0] == 0 and varied[0][1] > 0, varied

  # 3. The direction: ds4's L x D float32 file, a unit vector per layer.
  assert "functions.f32 (4, 256) float32 4096 bytes" in outputs
  (norms,), = [re.findall(r"direction norm per layer: ([\d. ]+)$", outputs, re.M)]
  assert np.allclose([float(x) for x in norms.split()], 1.0, atol=1e-5), norms
  # The sweep: log p(' function') falls as the scale grows (negative amplifies the direction,
  # positive removes then reverses it), for both probes, by more than a nat end to end.
  sweep = [(float(s), float(a), float(b)) for s, a, b in re.findall(
      r"^\s+([-\d.]+) \|\s+([-\d.]+)  '.*?' *\|\s+([-\d.]+)  '.*?'$", outputs, re.M)]
  assert [s for s, _, _ in sweep] == [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0], sweep
  for j in (1, 2):
    lp = np.array([row[j] for row in sweep])
    assert np.all(np.diff(lp) < 0) and lp[0] - lp[-1] > 1.0, lp
  assert "--- scale -2.0\nThe following is a function" in outputs
  assert "--- scale +0.0" in outputs and "--- scale +2.0" in outputs

  # 4. Patching hc_out: at every layer, all positions reproduce the source's logits (layers
  # after the patch read only the patched stream); at the last layer the last position is
  # the whole prediction (1) and the differing token is read by nothing (0).
  table = [tuple(map(float, r)) for r in re.findall(
      r"^\s+(\d)\s+([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s+([-+.\de]+)$", outputs, re.M)]
  assert [int(r[0]) for r in table] == [0, 1, 2, 3], table
  for il, token, last, every, dlogit in table:
    assert abs(every - 1.0) <= 1e-3 and dlogit <= 1e-5, table
  assert abs(table[-1][1]) <= 1e-3 and abs(table[-1][2] - 1.0) <= 1e-3, table

  pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(pngs) == 4

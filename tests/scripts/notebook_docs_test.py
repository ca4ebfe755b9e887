"""Notebook 02 (the docs model) runs top to bottom in a fresh kernel (a file of its own, so
the suite's two test processes can run the two notebooks at once)."""

import re

import pytest

from notebook_test import execute

pytestmark = pytest.mark.e2e


def test_docs_notebook_runs(tmp_path, monkeypatch, tiny_cache_dir):
  nb, outputs = execute("02_docs_model.ipynb", tmp_path, monkeypatch, tiny_cache_dir)
  assert "--- greedy: 'The assert statement'" in outputs and "--- sampled" in outputs
  # The quantisation study: held-out losses of both quantised models beat the unigram's.
  table = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(
      r"^(Q8_0 \(shipped\)|IQ2_XXS/Q2_K|unigram)\s+[\d.]+\s+([\d.]+)\s", outputs, re.M)}
  assert set(table) == {"Q8_0 (shipped)", "IQ2_XXS/Q2_K", "unigram"}, outputs
  assert table["Q8_0 (shipped)"] < table["unigram"] - 1.0
  assert table["IQ2_XXS/Q2_K"] < table["unigram"]
  assert "held-out" in outputs
  # Issue 24 item 13: the shipped file's perplexity is the same here as in the report.
  (here, then), = re.findall(r"Q8_0 ppl here ([\d.]+), in the training report ([\d.]+)", outputs)
  assert abs(float(here) - float(then)) < 0.02, (here, then)
  # Greedy text speaks the corpus (as tests/train/docs_model_test.py asks of generate.py).
  (known, total), = [tuple(map(int, m)) for m in re.findall(r"corpus words: (\d+)/(\d+)", outputs)]
  assert total >= 12 and known >= 0.6 * total, (known, total)
  pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(pngs) == 1

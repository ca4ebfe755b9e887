"""The notebooks run top to bottom in a fresh kernel."""

import json
import pathlib
import re
import sys

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]


def execute(name, tmp_path, monkeypatch, cache_dir):
  """Runs notebooks/<name> in a fresh kernel of this interpreter; returns (nb, stdout text)."""
  # A kernelspec for this interpreter, so the kernel sees the same venv as the test.
  spec = tmp_path / "jupyter" / "kernels" / "ds4jax-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "ds4jax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("DS4JAX_CACHE", cache_dir)
  nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="ds4jax-test", timeout=300,
                                   resources={"metadata": {"path": str(REPO)}})
  client.execute()
  outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
  return nb, outputs


def _numbers(outputs, pattern):
  return [float(m) for m in re.findall(pattern, outputs)]


def test_split_inference_notebook_runs(tmp_path, monkeypatch, tiny_gguf, tiny_cache_dir):
  nb, outputs = execute("01_split_inference.ipynb", tmp_path, monkeypatch, tiny_cache_dir)
  assert "same tokens: True" in outputs
  assert "same tokens over the bridge: True" in outputs
  assert "route: 0:1@local -> 2:2@127.0.0.1:" in outputs
  # What crosses the split: n_hc x d_model float32 per token (4 x 256 x 4 B = 4 KiB, tiny).
  assert _numbers(outputs, r"= (\d+) KiB/token") == [4.0]
  # The split's logits equal the whole model's (in process, one stage per layer, over the
  # bridge) to within float32 reassociation.
  dlogits = _numbers(outputs, r"max \|Δlogit\|[^:]*: ([-+.\de]+)")
  assert len(dlogits) == 3 and all(0 <= d <= 1e-4 for d in dlogits), dlogits
  # Issue 24 item 13: the f32 wire is exact: the bridge equals the same stages in process.
  assert _numbers(outputs, r"same stages in process: max \|Δlogit\| = ([-+.\de]+)") == [0.0]
  # Both figures rendered.
  pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(pngs) == 2

"""notebooks/01_split_inference.ipynb runs top to bottom in a fresh kernel."""

import json
import pathlib
import sys

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_split_inference_notebook_runs(tmp_path, monkeypatch, tiny_gguf, tiny_cache_dir):
  # A kernelspec for this interpreter, so the kernel sees the same venv as the test.
  spec = tmp_path / "jupyter" / "kernels" / "ds4jax-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "ds4jax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("DS4JAX_CACHE", tiny_cache_dir)
  nb = nbformat.read(REPO / "notebooks" / "01_split_inference.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="ds4jax-test", timeout=300,
                                   resources={"metadata": {"path": str(REPO)}})
  client.execute()
  outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
  assert "same tokens: True" in outputs
  assert "max |Δlogit| over" in outputs
  assert "KiB/token" in outputs
  assert "same tokens over the bridge: True" in outputs
  assert "route: 0:1@local -> 2:2@127.0.0.1:" in outputs
  # Both figures rendered.
  pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(pngs) == 2

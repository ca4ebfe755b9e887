"""Imports flow one way (docs/design.md, top): the model, the GGUF reader, quant and the
tokenizer never import `ds4jax.checkpoints`, nor `ds4jax.runtime.sources` (the path dispatcher that
does), not even inside a function. Checked twice: statically, over every import statement of
those packages, and live, in a fresh process that loads and runs a GGUF stage."""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BELOW = ("model", "gguf", "quant", "tokenizer")  # packages below checkpoints and sources
FORBIDDEN = ("ds4jax.checkpoints", "ds4jax.runtime.sources")


def _imports(path: pathlib.Path):
  """(line, module) of every import in a file, deferred ones included; `from ds4jax import
  x` counts as `ds4jax.x`, and a bare `import ds4jax` (lazy attributes) as `ds4jax`."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield node.lineno, a.name
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.lineno, node.module
      for a in node.names:
        yield node.lineno, f"{node.module}.{a.name}"


@pytest.mark.parametrize("package", BELOW)
def test_lower_packages_never_import_checkpoints(package):
  bad = []
  for path in sorted((REPO / "ds4jax" / package).rglob("*.py")):
    for line, mod in _imports(path):
      if mod == "ds4jax" or any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN):
        bad.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
  assert not bad, "\n".join(bad)


LIVE = r"""
import sys
import numpy as np
from ds4jax.runtime import api, load
from ds4jax.tokenizer import Tokenizer
path = sys.argv[1]
tok = Tokenizer.from_gguf(path)
runner = load.load_runner(path, "0:output", ctx_size=8, max_chunk=4, compile_sizes=(1,))
runner.forward(runner.init_state(), np.array(tok.encode("hi")[:2], np.int32), None, 0)
api.Model.from_source(path, "all", ctx_size=8, max_chunk=4).logits([0, 1])
bad = sorted(m for m in sys.modules
             if m.split(".")[0] == "orbax" or m.startswith(("ds4jax.checkpoints", "ds4jax.runtime.sources")))
print("LOADED", bad)
"""


@pytest.mark.e2e
def test_loading_a_gguf_imports_no_checkpoint_code(tiny_gguf):
  r = subprocess.run([sys.executable, "-c", LIVE, tiny_gguf], capture_output=True, text=True,
                     timeout=300, cwd=str(REPO))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "LOADED []" in r.stdout, r.stdout

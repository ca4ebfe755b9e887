"""The house holds its shape (docs/design.md §0, issue 20): the layer table, checked on the code.

- Imports flow down the table: a package imports only packages on lower floors (or, on its
  own row, those the row names), deferred imports inside functions included. At most two
  imports may climb, each named below with its reason.
- No import circles between files.
- No module under ds4jax/ (nor a script) imports `ds4jax.testing`: test doubles import
  production, never the reverse.
- No hand-written module under ds4jax/ or scripts/ is over 500 lines.
- The model, the GGUF reader, quant and the tokenizer never import `ds4jax.checkpoints`, nor
  `ds4jax.runtime.sources` (the path dispatcher that does), not even inside a function;
  checked statically here and live in a fresh process that loads and runs a GGUF stage.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "ds4jax"

# The layer table of docs/design.md §0: package (or module) -> floor.
FLOORS = {
    "ds4jax.config": 1, "ds4jax.extras": 1, "ds4jax.errors": 1, "ds4jax.data": 1,
    "ds4jax.tokenizer": 1, "ds4jax.wire": 1, "ds4jax.local_cluster": 1,
    "ds4jax.quant": 2, "ds4jax.gguf": 2,
    "ds4jax.model": 3,
    "ds4jax.checkpoints": 4, "ds4jax.partition": 4,
    "ds4jax.runtime": 5,
    "ds4jax.bridge.worker": 6, "ds4jax.bridge.coordinator": 6,
    "ds4jax.build": 7,
    "ds4jax.generate": 8,
    "ds4jax.cli": 9,
    "ds4jax.serving": 10, "ds4jax.localai": 10, "ds4jax.train": 10, "ds4jax.bench": 10,
    "ds4jax.entry_points": 11,
}
# Imports within one row that the row allows: (importer, imported).
SAME_ROW = {("ds4jax.gguf", "ds4jax.quant"), ("ds4jax.localai", "ds4jax.serving")}
# The imports that may climb a floor (at most two): (file, imported module) -> why.
CLIMBS: dict[tuple[str, str], str] = {}
TESTING = "ds4jax.testing"
GENERATED = ("ds4jax/localai/backend_pb2.py", "ds4jax/localai/backend_pb2_grpc.py")
MAX_LINES = 500
BELOW = ("model", "gguf", "quant", "tokenizer")  # packages below checkpoints and sources
FORBIDDEN = ("ds4jax.checkpoints", "ds4jax.runtime.sources")


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(REPO).as_posix()


def _module(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*dirs: str) -> list[pathlib.Path]:
  return sorted(p for d in dirs for p in (REPO / d).rglob("*.py") if ".ipynb" not in str(p))


def _resolve(name: str) -> str:
  """`ds4jax.a.b` as the module it names: the longest prefix that is a file or package."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    if _is_module(".".join(parts[:n])):
      return ".".join(parts[:n])
  return name


def _is_module(name: str) -> bool:
  base = REPO.joinpath(*name.split("."))
  return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _raw_imports(path: pathlib.Path):
  """(line, module) of every import in a file, deferred ones included. `from P import x`
  counts as `P.x` where that is a module, else as `P`; so `from ds4jax import cli` is
  `ds4jax.cli`, and `import ds4jax` or `from ds4jax import load_model` (the root's lazy
  attributes) is `ds4jax`."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield node.lineno, a.name
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        full = f"{node.module}.{a.name}"
        yield node.lineno, full if _is_module(full) else node.module


def _imports(path: pathlib.Path) -> dict[str, int]:
  """{ds4jax module: first line} that a file imports (resolved to files and packages)."""
  out: dict[str, int] = {}
  for line, name in _raw_imports(path):
    if name == "ds4jax" or name.startswith("ds4jax."):
      mod = _resolve(name)
      out[mod] = min(line, out.get(mod, line))
  return out


def _package(module: str) -> str | None:
  best = None
  for p in FLOORS:
    if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best)):
      best = p
  return best


def _root_floor() -> int:
  """The floor of `import ds4jax`: the highest floor its lazy exports reach."""
  tree = ast.parse((PKG / "__init__.py").read_text())
  exports = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "_EXPORTS" for t in n.targets))
  return max(FLOORS[_package(m)] for m in exports.values())


def _floor(module: str) -> int | None:
  if module == "ds4jax":
    return _root_floor()
  p = _package(module)
  return None if p is None else FLOORS[p]


PRODUCTION = [p for p in _sources("ds4jax") if not _module(p).startswith(TESTING)]


def test_every_module_has_a_floor():
  faces = {"ds4jax", "ds4jax.bridge"}  # packages whose __init__ only hands names on
  bad = [_rel(p) for p in PRODUCTION if _module(p) not in faces and _package(_module(p)) is None]
  assert not bad, "modules outside the layer table of docs/design.md §0:\n" + "\n".join(bad)


def test_imports_flow_down_the_table():
  bad, used = [], set()
  for path in PRODUCTION:
    me = _module(path)
    mine, my_floor = _package(me), _floor(me)
    if my_floor is None:
      continue  # test_every_module_has_a_floor names it
    for mod, line in _imports(path).items():
      if mod.startswith(TESTING):
        continue  # test_production_never_imports_testing names it
      theirs, floor = _package(mod), _floor(mod)
      if floor is None or theirs == mine or (mine, theirs) in SAME_ROW or floor < my_floor:
        continue
      if (_rel(path), mod) in CLIMBS:
        used.add((_rel(path), mod))
        continue
      bad.append(f"{_rel(path)}:{line} ({mine}, floor {my_floor}) imports {mod} (floor {floor})")
  assert not bad, "imports that climb a floor:\n" + "\n".join(bad)
  assert len(CLIMBS) <= 2 and used == set(CLIMBS), f"stale or too many CLIMBS: {CLIMBS}"


def test_no_import_circles_between_files():
  files = {_module(p): p for p in PRODUCTION}
  graph = {m: [d for d in _imports(p) if d in files and d != m] for m, p in files.items()}
  index, low, stack, on, circles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        circles.append(" <-> ".join(sorted(comp)))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not circles, "import circles:\n" + "\n".join(circles)


def test_production_never_imports_testing():
  bad = [f"{_rel(p)}:{line} imports {mod}"
         for p in PRODUCTION + _sources("scripts")
         for mod, line in _imports(p).items() if mod.startswith(TESTING)]
  assert not bad, "\n".join(bad)


def test_no_module_over_500_lines():
  bad = []
  for path in _sources("ds4jax", "scripts"):
    n = len(path.read_text().splitlines())
    if n > MAX_LINES and _rel(path) not in GENERATED:
      bad.append(f"{_rel(path)}: {n} lines")
  assert not bad, f"modules over {MAX_LINES} lines:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", BELOW)
def test_lower_packages_never_import_checkpoints(package):
  bad = []
  for path in sorted((PKG / package).rglob("*.py")):
    for line, mod in _raw_imports(path):
      if mod == "ds4jax" or any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN):
        bad.append(f"{_rel(path)}:{line} imports {mod}")
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
api.Model(load.load_runner(path, "all", ctx_size=8, max_chunk=4)).logits([0, 1])
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

"""Console entry points (pyproject `[project.scripts]`): ds4jax-worker, ds4jax-generate,
ds4jax-serve and ds4jax-localai.

The launch scripts stay in scripts/ (short absl mains, style rule 8); these run them as
`__main__`, from the source tree (editable installs, checkouts) or from
`<prefix>/share/ds4jax/scripts` (where a wheel puts them). ds4jax-worker also takes
ds4-worker's spelling (`--role worker --model PATH ... --coordinator HOST PORT`).
"""

from __future__ import annotations

import pathlib
import runpy
import sys
import sysconfig


def scripts_dir() -> pathlib.Path | None:
  """Where scripts/worker.py and its siblings are, or None."""
  here = pathlib.Path(__file__).resolve().parent
  for d in (here.parent / "scripts", pathlib.Path(sys.prefix) / "share" / "ds4jax" / "scripts",
            pathlib.Path(sysconfig.get_path("data")) / "share" / "ds4jax" / "scripts"):
    if (d / "worker.py").is_file():
      return d
  return None


def _run(name: str) -> None:
  d = scripts_dir()
  if d is None:
    print(f"error: cannot find ds4jax's scripts/{name} (neither in the source tree nor in "
          f"{sys.prefix}/share/ds4jax/scripts): reinstall ds4jax", file=sys.stderr)
    raise SystemExit(2)
  path = str(d / name)
  sys.argv[0] = path
  runpy.run_path(path, run_name="__main__")


def worker() -> None:
  _run("worker.py")


def generate() -> None:
  _run("generate.py")


def serve() -> None:
  _run("serve.py")


def localai() -> None:
  from ds4jax.localai.main import run
  run()


if __name__ == "__main__":  # python -m ds4jax.entry_points worker ARGS...
  if len(sys.argv) < 2 or sys.argv[1] not in ("worker", "generate", "serve", "localai"):
    print("usage: python -m ds4jax.entry_points worker|generate|serve|localai ARGS...",
          file=sys.stderr)
    raise SystemExit(2)
  cmd = sys.argv.pop(1)
  globals()[cmd]()

#!/usr/bin/env bash
# LocalAI starts this as `run.sh --addr 127.0.0.1:PORT` (docs/localai.md): it execs the ds4jax
# LocalAI backend with the same arguments. The Python is $DS4JAX_PYTHON, else venv/ next to
# this file (install.sh makes it), else python3 from PATH (ds4jax[localai] installed there).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${DS4JAX_PYTHON:-}" ]; then
  PY="$DS4JAX_PYTHON"
elif [ -x "$HERE/venv/bin/python" ]; then
  PY="$HERE/venv/bin/python"
else
  PY="$(command -v python3)"
fi
if [ -d "$HERE/lib" ]; then  # as LocalAI's own backends: bundled shared libraries first
  export LD_LIBRARY_PATH="$HERE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
exec "$PY" -m ds4jax.localai "$@"

#!/usr/bin/env bash
# Makes venv/ next to this file and installs ds4jax with its localai extra into it, so run.sh
# works when LocalAI spawns it. ds4jax comes from $DS4JAX_SRC (a checkout or any pip
# requirement, e.g. a wheel), else from the checkout this directory sits in.
#   bash localai/ds4jax/install.sh                         # in a ds4jax checkout
#   DS4JAX_SRC=/src/ds4jax bash <backends>/ds4jax/install.sh
# USE_SYSTEM_SITE=1 makes the venv see the system's packages (an existing JAX, say).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=${PYTHON:-python3}
SRC=${DS4JAX_SRC:-}
if [ -z "$SRC" ] && [ -f "$HERE/../../pyproject.toml" ]; then
  SRC="$(cd "$HERE/../.." && pwd)"
fi
if [ -z "$SRC" ]; then
  echo "error: set DS4JAX_SRC to a ds4jax checkout or wheel (this directory is not in one)" >&2
  exit 2
fi
if [ ! -x "$HERE/venv/bin/python" ]; then
  "$PY" -m venv ${USE_SYSTEM_SITE:+--system-site-packages} "$HERE/venv"
fi
VPY="$HERE/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
if [ -d "$SRC" ]; then
  "$VPY" -m pip install -q "$SRC[localai]"
else
  "$VPY" -m pip install -q "$SRC" -r "$HERE/requirements.txt"
fi
"$VPY" -c "import ds4jax.localai.server" && echo "ds4jax LocalAI backend installed in $HERE/venv"

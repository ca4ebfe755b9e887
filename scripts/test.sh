#!/usr/bin/env bash
# Installs ds4jax with its test, serve, reference and localai extras into .venv and runs pytest
# (arguments go to pytest: `bash scripts/test.sh -m "not e2e"` is the inner loop;
# DS4JAX_TEST_WORKERS=1 runs them in one process). The suite's
# test models and XLA compilations persist in $DS4JAX_CACHE/jax-<version> (default
# ~/.cache/ds4jax/jax-<version>): a second run loads what the first compiled.
# pytest's exit 5 (no tests collected) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
EXTRAS="test,train,serve,reference,localai"
echo "installing ds4jax[$EXTRAS] into .venv (log: .venv/install.log)"
if ! { python -m pip install -q --upgrade pip && python -m pip install -q -e ".[$EXTRAS]"; } \
    > .venv/install.log 2>&1; then
  tail -n 40 .venv/install.log; echo "install failed"; exit 1
fi
set +e
# Two test processes (pytest-xdist), a file each at a time (module fixtures stay whole):
# many tests wait on the scripts, servers and workers they start, so two fill two cores.
python -m pytest -q -n "${DS4JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"

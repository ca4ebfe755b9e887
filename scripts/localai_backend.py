r"""ds4jax as a LocalAI backend: serves LocalAI's gRPC backend protocol (docs/localai.md).

    python scripts/localai_backend.py --addr 127.0.0.1:50051

LocalAI starts it (localai/ds4jax/run.sh), polls Health, then sends LoadModel with the model
YAML's options: `ds4_role:coordinator`, `ds4_layers:0:K`, `ds4_listen:HOST:PORT` and
`ds4_route_timeout:S` make it the coordinator of a split that scripts/worker.py processes dial
into; without them it runs the whole model. Needs the `localai` extra.

It exits when the process that started it exits (LocalAI's parent watch), so started by hand
from a shell it goes with that shell: `--parent_watch=0` (or LOCALAI_BACKEND_PARENT_WATCH=0)
runs it on its own.
"""

from absl import flags

from ds4jax.localai import main
from ds4jax.localai.main import run

flags.adopt_module_key_flags(main)  # --help lists --addr, --cache_dir and --parent_watch

if __name__ == "__main__":
  run()

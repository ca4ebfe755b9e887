r"""ds4jax as a LocalAI backend: serves LocalAI's gRPC backend protocol (docs/localai.md).

    python scripts/localai_backend.py --addr 127.0.0.1:50051

LocalAI starts it (localai/ds4jax/run.sh), polls Health, then sends LoadModel with the model
YAML's options: `ds4_role:coordinator`, `ds4_layers:0:K`, `ds4_listen:HOST:PORT` and
`ds4_route_timeout:S` make it the coordinator of a split that scripts/worker.py processes dial
into; without them it runs the whole model. Needs the `localai` extra.
"""

from ds4jax.localai.main import run

if __name__ == "__main__":
  run()

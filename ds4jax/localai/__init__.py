"""ds4jax as a LocalAI backend: LocalAI's gRPC `backend.Backend` with ds4's options (issue 16).

    python scripts/localai_backend.py --addr 127.0.0.1:50051    # or ds4jax-localai, or
    python -m ds4jax.localai --addr 127.0.0.1:50051             # what localai/ds4jax/run.sh runs

`options` (LoadModel options, no gRPC), `predict` (PredictOptions -> job), `model` (the model
process), `status`, `auth`, `server` (the servicer; needs the `localai` extra), `main` (the
command line), `ds4_args` (ds4-worker's argument spelling for scripts/worker.py). See
docs/localai.md. Importing this package imports neither gRPC nor JAX.
"""

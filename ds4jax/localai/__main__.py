"""`python -m ds4jax.localai --addr HOST:PORT`: the LocalAI backend server."""

from ds4jax.localai.main import run

if __name__ == "__main__":
  run()

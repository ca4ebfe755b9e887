"""The OpenAI-compatible HTTP server (docs/serving.md).

    from ds4jax.serving.app import create_app          # FastAPI app around a Backend
    from ds4jax.serving.remote import ModelProcess     # the model in a child process

Nothing here imports JAX at module level: the HTTP process of `scripts/serve.py` never loads it.
"""

"""The test suite's standard shapes for the tiny model: every test process and every script it
starts use this context and prefill chunk (unless a test is about another size), so they all
compile, or load from the persistent compilation cache, the same executables."""

CTX = 128  # KV capacity, tokens
CHUNK = 16  # most tokens per prefill call

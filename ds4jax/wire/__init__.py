"""The bridge's bytes: frames and their headers (`protocol`, `headers`), activations on the
wire (`tensors`), sockets and TLS (`transport`), key authentication (`auth`) and the errors
every side can act on (`errors`). Stdlib and numpy only (docs/protocol.md)."""

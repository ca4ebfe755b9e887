#!/usr/bin/env bash
# Regenerates ds4jax/localai/backend_pb2.py and backend_pb2_grpc.py from backend.proto.
# The generated files are committed, so installing ds4jax[localai] needs no protoc; rerun this
# after editing the .proto (needs grpcio-tools, part of the localai extra). The generated code
# checks at import that the installed grpcio and protobuf are at least the generating ones:
# keep the localai extra's lower bounds in pyproject.toml equal to the versions printed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. ds4jax/localai/backend.proto
grpc=$(sed -n "s/^GRPC_GENERATED_VERSION = '\\(.*\\)'/\\1/p" ds4jax/localai/backend_pb2_grpc.py)
pb=$(sed -n 's/^# Protobuf Python Version: //p' ds4jax/localai/backend_pb2.py)
echo "generated for grpcio>=$grpc, protobuf>=$pb (the localai extra's lower bounds)"

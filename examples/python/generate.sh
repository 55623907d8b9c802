#!/usr/bin/env bash
# Generates the Python gRPC client code from proto/ into generated/ (not
# committed). Needs grpcio-tools (pip install -r requirements.txt); run it
# with the Python that will run example.py, or set PYTHON.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto="$here/../../proto"
out="$here/generated"
python="${PYTHON:-python3}"
# grpcio-tools ships the well-known types (google/protobuf/*.proto).
wkt="$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
rm -rf "$out"
mkdir -p "$out"
"$python" -m grpc_tools.protoc \
    -I "$proto" -I "$wkt" \
    --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    "$proto"/webhooks/v1/*.proto
echo "generated $(find "$out" -name '*.py' | wc -l) modules in $out"

"""The committed gRPC code must be what grpcio-tools generates from proto/ today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["replication_pb2.py", "replication_pb2_grpc.py", "replication_pb2.pyi"]


def test_generated_code_matches_proto(tmp_path):
    proto = "proto/cargohold/replication/v1/replication.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", proto], cwd=ROOT, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "cargohold/replication/v1" / name).read_text()
        committed = (ROOT / "cargohold/replication/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate it (see docs/architecture.md, 'gRPC code')"

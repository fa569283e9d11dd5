# A Python gRPC client of the peer (grpcio: gRPC's C core, not grpc-js), run by
# tests/grpc_interop_test.ts: it compiles the protos with grpcio-tools, calls Echo, ListFiles and
# Download (all of one fragment, a missing one, a traversal name, one past its deadline, one
# cancelled in the middle), then grpc.health.v1.Health (Check and Watch), and prints one JSON line
# of what it got.
# Usage: python3 client.py <host:port> <proto file> <health proto> <fragment name> <out dir>
import hashlib
import importlib
import json
import os
import sys

import grpc
from grpc_tools import protoc

address, proto, health_proto, name, out = sys.argv[1:6]
for path in (proto, health_proto):
    include = os.path.dirname(path)
    args = ["protoc", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", path]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {path}")
sys.path.insert(0, out)
pb = importlib.import_module("file_transfer_pb2")
rpc = importlib.import_module("file_transfer_pb2_grpc")
health = importlib.import_module("health_pb2")
health_rpc = importlib.import_module("health_pb2_grpc")

channel = grpc.insecure_channel(address)
stub = rpc.FileTransferStub(channel)
result = {"echo": stub.Echo(pb.EchoRequest(message="hello from python"), timeout=10).message}
result["listed"] = sorted(f.name for f in stub.ListFiles(pb.ListFilesRequest(), timeout=10).fragments)

digest = hashlib.sha256()
sizes = []
for i, chunk in enumerate(stub.Download(pb.DownloadRequest(name=name), timeout=10)):
    if i == 0:
        result["size"], result["sha256"] = chunk.size, chunk.sha256
    digest.update(chunk.data)
    sizes.append(len(chunk.data))
result["received"], result["chunkSizes"] = digest.hexdigest(), sizes


def status_of(request, **options):
    try:
        for _ in stub.Download(request, **options):
            pass
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


result["missing"] = status_of(pb.DownloadRequest(name="fragment_9.bin"), timeout=10)
result["traversal"] = status_of(pb.DownloadRequest(name="../etc/passwd"), timeout=10)
result["deadline"] = status_of(pb.DownloadRequest(name=name), timeout=0.001)
call = stub.Download(pb.DownloadRequest(name=name), timeout=10)
next(call)
call.cancel()
result["cancelled"] = call.code().name
result["afterCancel"] = stub.Echo(pb.EchoRequest(message="still here"), timeout=10).message

checker = health_rpc.HealthStub(channel)
serving = health.HealthCheckResponse.ServingStatus.Name
check = checker.Check(health.HealthCheckRequest(service="p2p.FileTransfer"), timeout=10)
result["check"] = serving(check.status)
watch = checker.Watch(health.HealthCheckRequest(service=""), timeout=10)
result["watched"] = serving(next(watch).status)
watch.cancel()
print(json.dumps(result))

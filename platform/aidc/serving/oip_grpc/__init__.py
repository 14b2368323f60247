"""Open Inference Protocol gRPC stubs: the generated KServe v2 messages and servicer registration (the path Serve
configs name in grpc_servicer_functions); converters to the data plane: aidc.serving.oip.grpc_codec.

`grpc_predict_v2_pb2*.py` are generated from `grpc_predict_v2.proto` (see README.md here); they need
protobuf >= 7.35 and grpcio >= 1.85 at run time, which the project venv has.
"""

from __future__ import annotations

from aidc.serving.oip_grpc import grpc_predict_v2_pb2 as pb
from aidc.serving.oip_grpc.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server

SERVICER = "aidc.serving.oip_grpc.add_GRPCInferenceServiceServicer_to_server"  # Serve's grpc_servicer_functions

__all__ = ["SERVICER", "add_GRPCInferenceServiceServicer_to_server", "pb"]

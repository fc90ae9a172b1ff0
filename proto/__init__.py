"""moe-serve's gRPC API: moe_serve.proto and the code generated from it.

Regenerate after editing the .proto (a test checks that the generated code is current), with the grpcio-tools
that pyproject.toml's test extra pins (the generated code names its version as the least grpcio it runs on):
    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/moe_serve.proto
"""

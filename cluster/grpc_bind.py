"""bind_grpc_host: makes Ray Serve's gRPC proxy listen on the host `moe-serve up` was given.

Serve's gRPC proxy binds `[::]:port` (every interface) and gRPCOptions has no host, unlike HTTPOptions. This
function runs in each Ray worker process of a Ray that `moe-serve up` starts (its `worker_process_setup_hook`)
and, where MOE_SERVE_GRPC_HOST is set, makes the proxy's server bind that host instead.
"""

from __future__ import annotations

import os

HOST_VAR = "MOE_SERVE_GRPC_HOST"


def bind_grpc_host() -> None:
    host = os.environ.get(HOST_VAR)
    if not host:
        return
    from ray.serve._private import default_impl

    bind_any = default_impl.add_grpc_address

    def bind_host(server, address: str) -> None:
        port = address.rsplit(":", 1)[1]
        bind_any(server, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    default_impl.add_grpc_address = bind_host


def runtime_env(host: str) -> dict:
    """The Ray runtime_env that binds the gRPC proxy to host."""
    return {"env_vars": {HOST_VAR: host}, "worker_process_setup_hook": "cluster.grpc_bind.bind_grpc_host"}

"""bind_grpc_host: makes Ray Serve's gRPC proxy listen on the host `moe-serve up` was given.

Serve's gRPC proxy binds `[::]:port` (every interface) and gRPCOptions has no host, unlike HTTPOptions. This
function runs as each Ray worker process of a Ray that `moe-serve up` starts sets up (its
`worker_process_setup_hook`), and, where MOE_SERVE_GRPC_HOST is set, makes the proxy's server bind that host
instead. It changes nothing until Serve's module that binds is imported (in the proxy), so other workers pay
nothing for it.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

HOST_VAR = "MOE_SERVE_GRPC_HOST"
BINDER = "ray.serve._private.default_impl"  # its add_grpc_address(server, "[::]:port") binds the proxy


def bind_grpc_host() -> None:
    host = os.environ.get(HOST_VAR, "").strip("[]")
    if not host or host in ("::", "0.0.0.0"):
        return
    if BINDER in sys.modules:
        patch(sys.modules[BINDER], host)
    else:
        sys.meta_path.insert(0, PatchOnImport(host))


def patch(module, host: str) -> None:
    bind_any = module.add_grpc_address

    def bind_host(server, address: str) -> None:
        port = address.rsplit(":", 1)[1]
        bind_any(server, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    module.add_grpc_address = bind_host


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches BINDER right after it is first imported."""

    def __init__(self, host: str):
        self.host = host

    def find_spec(self, name, path, target=None):
        if name != BINDER:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            patch(module, self.host)

        spec.loader.exec_module = exec_and_patch
        return spec


def runtime_env(host: str) -> dict:
    """The Ray runtime_env that binds the gRPC proxy to host."""
    return {"env_vars": {HOST_VAR: host}, "worker_process_setup_hook": "cluster.grpc_bind.bind_grpc_host"}

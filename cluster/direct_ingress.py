"""direct_ingress_env: the environment that makes Ray Serve's Ingress replicas serve HTTP and gRPC themselves, on the
server's ports (Serve's direct ingress), instead of behind Serve's proxy.

Through the proxy, every streamed chunk crosses one more process: client -> proxy -> Ingress replica (a Ray call,
and a Ray stream item back per chunk). Direct, the client talks to the Ingress replica's own HTTP and gRPC servers.
At concurrency 64 here that is ~13% more output tokens/s (benchmarks/RESULTS.md). Serve allocates each Ingress
replica a port from a range per node; the range is set to start at the server's ports, so the first replica on a
node takes exactly them and a second one the next. Serve still starts its proxy (its options are the replicas'
too); it is moved to free ports the OS picks, where nothing is sent to it.

Serve reads these variables as its processes start, so they hold only for a Ray that `moe-serve up` starts.
"""

from __future__ import annotations

import socket
import time


def direct_ingress_env(http_port: int, grpc_port: int, router_replicas: int) -> dict[str, str]:
    """The variables for Ingress replicas listening on [http_port, http_port + router_replicas) and the same from
    grpc_port (one replica per node takes the first)."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + router_replicas),  # exclusive
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + router_replicas),
        # a restarted replica takes its port back at once (the hold is for HAProxy's stale server lists; none here)
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # nothing in front has to notice a stopping replica; in-flight requests are still drained
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def proxy_ports(host: str) -> tuple[int, int]:
    """(HTTP, gRPC) ports for Serve's unused proxy: HTTP on 0 (the OS picks as it binds); gRPC needs a real port
    (Serve serves no gRPC, on the replicas either, when its port is 0), so one the OS says is free now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return 0, s.getsockname()[1]


def wait_until_bindable(host: str, port: int, timeout_s: float = 90.0) -> float:
    """Waits until the port can be bound as Serve's direct HTTP server binds it (no SO_REUSEADDR), returns the
    seconds waited. A port held with nothing listening (a server stopped just before, its sockets not yet gone) is
    waited for; a process listening there is an error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = (host.strip("[]"), port)
    reach = ("::1" if family == socket.AF_INET6 else "127.0.0.1") if host in ("0.0.0.0", "::") else address[0]
    t0 = time.monotonic()
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(address)
                return time.monotonic() - t0
            except OSError as e:
                error = e
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(2)
            if client.connect_ex((reach, port)) == 0:
                raise OSError(f"port {port} on {host} is in use ({error.strerror}): something listens there; stop "
                              "it or give another port")
        if time.monotonic() - t0 > timeout_s:
            raise OSError(f"port {port} on {host} is still held by closed connections after {timeout_s:.0f} s")
        time.sleep(0.5)

"""`moe-serve up` with no arguments, as a user runs it: it makes the embedded default model, serves it, answers a
first real request over HTTP and prints it, serves others over HTTP and gRPC, on loopback only, reports healthy
(gRPC health, `moe-serve status`), and Ctrl-C stops it cleanly. With `--ingress direct`, the same, with the Ingress
replica itself (not Serve's proxy) on the ports; with `--ingress engine`, the one engine replica on the ports, with no
Ingress replica (and, with `--no-ray-dashboard`, no Ray dashboard)."""

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import malloc
from proto import moe_serve_pb2 as pb
from proto import moe_serve_pb2_grpc as pb_grpc
from workers.multiproc_executor import free_port


@pytest.mark.parametrize("ingress", ["proxy", "direct", "engine"])
def test_up_serves_the_default_model_and_stops_on_ctrl_c(tmp_path, ingress):
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    no_dashboard = ["--no-ray-dashboard"] if ingress == "engine" else []  # the Ray dashboard left out here
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--ingress", ingress, *no_dashboard], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines)  # it exited early
            lines.append(line)
            if line.startswith("  -> "):  # the first request's answer
                break
        out = "".join(lines)
        assert f"HTTP (OpenAI-compatible): http://127.0.0.1:{http_port}/v1" in out
        assert "first request answered" in out and "24 generated" in out
        assert (tmp_path / "moe-serve" / "tiny-deepseek-v2" / "tokenizer_config.json").is_file()
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=60,
                       json={"prompt": "def f(", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            replies = list(pb_grpc.MoeServeStub(channel).Generate(
                pb.GenerateRequest(text="def f(", params=pb.SamplingParams(max_tokens=5, temperature=0,
                                                                             ignore_eos=True)),
                metadata=[("application", "moe-serve")]))
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="moe_serve.v1.MoeServe"), metadata=[("application", "moe-serve")])
        assert sum(len(m.token_ids) for m in replies) == 5
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        status = subprocess.run([sys.executable, "-m", "cluster.cli", "status"], env=env, capture_output=True,
                                text=True, timeout=60, check=False)
        assert status.returncode == 0, status.stderr
        holder = "EngineIngress" if ingress == "engine" else "EngineServer"
        assert f"{holder}: HEALTHY, replicas: 1 RUNNING" in status.stdout, status.stdout
        assert status.stdout.count("KV cache") == 1, status.stdout  # the engine replica posted its stats
        listener = {"proxy": "ProxyActor", "direct": "ServeReplica:moe-serve:Ingress ",
                    "engine": "ServeReplica:moe-serve:EngineIngress"}[ingress]
        for port in (http_port, grpc_port):  # both doors on loopback, not on the machine's other addresses
            sockets = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port]
            listening = [c.laddr.ip for c in sockets]
            assert listening and set(listening) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, (port, listening)
            owners = {" ".join(psutil.Process(c.pid).cmdline()) + " " for c in sockets}
            assert all(listener in owner for owner in owners), (port, owners)
            for address in {a.address for nic in psutil.net_if_addrs().values() for a in nic
                            if a.family == socket.AF_INET and not a.address.startswith("127.")}:
                with socket.socket() as s:
                    assert s.connect_ex((address, port)) != 0, f"port {port} answers on {address}"
        ray_processes = psutil.Process(proc.pid).children(recursive=True)  # the local Ray it started
        assert any("raylet" in c.name() for c in ray_processes)
        dashboard_modules = [c for c in ray_processes if "ray-dashboard-" in " ".join(c.cmdline())]
        assert bool(dashboard_modules) != bool(no_dashboard)  # `moe-serve status` above answered without them
        engine = [c for c in ray_processes if holder in " ".join(c.cmdline())]
        assert len(engine) == 1
        ingress_replicas = [c for c in ray_processes if "moe-serve:Ingress " in " ".join(c.cmdline()) + " "]
        assert len(ingress_replicas) == (0 if ingress == "engine" else 1)
        if malloc.tcmalloc() and "LD_PRELOAD" not in os.environ:  # the default, where installed: in the replica
            assert "memory allocator of the workers: tcmalloc" in out
            assert any("tcmalloc" in m.path for m in engine[0].memory_maps())
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "moe-serve: shutting down" in rest
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, alive  # Ray went down with it

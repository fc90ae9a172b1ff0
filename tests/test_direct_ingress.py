"""wait_until_bindable: `moe-serve up --ingress direct` starts on a free port at once, refuses a port something
listens on with a message that says so, and waits out one held only by closed connections."""

import socket
import threading
import time

import pytest

from cluster.direct_ingress import direct_ingress_env, wait_until_bindable


def test_a_free_port_is_taken_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert wait_until_bindable("127.0.0.1", port, timeout_s=5) < 1


def test_a_port_something_listens_on_is_refused_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is in use .*something listens there"):
            wait_until_bindable("127.0.0.1", port, timeout_s=30)
        assert time.monotonic() - t0 < 5


def test_a_port_bound_but_not_listening_is_waited_for():
    """Held, with nothing accepting (as closed connections hold it): waited for until it is let go."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    threading.Timer(1.5, holder.close).start()
    assert 1 < wait_until_bindable("127.0.0.1", port, timeout_s=30) < 10


def test_the_replicas_port_ranges_start_at_the_servers_ports():
    env = direct_ingress_env(8000, 9000, 2)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8000",
                                                                                                               "8002")
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]) == ("9000",
                                                                                                               "9002")

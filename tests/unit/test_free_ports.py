"""Ports for test and benchmark nodes: free, distinct, and out of the kernel's ephemeral range."""

import socket

from shoal.bench.nodes import _ephemeral_low, free_port, free_ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    avoid = free_port()
    ports = free_ports(20, avoid=avoid)
    assert len(set(ports)) == 20 and avoid not in ports
    assert all(10000 <= p < max(11000, _ephemeral_low()) for p in ports)
    for port in ports:  # each can be bound now
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out() -> None:
    held = []
    try:
        for _ in range(800):  # fill part of the range (~1 in 30), then draw around it
            s = socket.socket()
            s.bind(("127.0.0.1", free_port()))
            s.listen()
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        assert not taken & set(free_ports(100))
    finally:
        for s in held:
            s.close()

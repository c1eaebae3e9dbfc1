"""A free TCP port: for a server a test starts later (torchrun's), or an address nothing listens at.

A port from bind(0) comes from the kernel's ephemeral range, which is also where it picks the
local port of every outgoing connection: between the test releasing the port and the launcher
binding it seconds later (after it imports torch), any connect() on this machine, node 1's own
included, may be given that port. connect() never picks a port outside the range, so the port is
taken outside it."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_DEFAULT = (32768, 60999)


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = RANGE_FILE.read_text().split()
    except FileNotFoundError:
        return LINUX_DEFAULT
    return int(low), int(high)


def free_port() -> int:
    """A port in 20000-32767 outside the ephemeral range that binds now, from a random start so
    that two test runs on one machine seldom try the same one."""
    low, high = ephemeral_range()
    ports = [p for p in range(20000, 32768) if not low <= p <= high]
    if not ports:
        pytest.fail(f"no port in 20000-32767 is outside the ephemeral range {low}-{high}")
    # Not `random`'s global generator: a test or library that seeds it would make every run pick
    # the same ports.
    start = random.SystemRandom().randrange(len(ports))
    for port in ports[start:] + ports[:start]:
        with socket.socket() as s:
            try:
                s.bind(("", port))  # all addresses: a server on any of them holds the port
            except OSError:
                continue
            return port
    pytest.fail("every port in 20000-32767 outside the ephemeral range is taken")

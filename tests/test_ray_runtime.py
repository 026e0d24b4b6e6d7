"""The embedded Ray must listen on loopback only (the machine policy; see evl_cache/ray_runtime.py)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from evl_cache.ray_runtime import ray_session


def _listening() -> set[tuple[str, int]]:
    """Listening TCP sockets from /proc/net/tcp{,6} as (address, port)."""
    out = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state != "0A":  # LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            out.add((str(addr), int(hex_port, 16)))
    return out


def test_embedded_ray_listens_on_loopback_only():
    before = _listening()
    with ray_session(num_cpus=1) as ray:
        assert ray.is_initialized()
        new = _listening() - before
    assert new, "Ray opened no listening socket? the check would be vacuous"
    exposed = [(a, p) for a, p in new if not ipaddress.ip_address(a).is_loopback]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"


def test_embedded_ray_workers_run_at_the_callers_priority(monkeypatch):
    """Ray's default puts workers at nice 15, where any other job on the machine starves them; an
    embedded session runs them at the caller's niceness unless the user set RAY_worker_niceness."""
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    with ray_session(num_cpus=1) as ray:
        niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
    assert niceness == os.nice(0)


def test_a_users_ray_worker_niceness_is_left_to_ray(monkeypatch):
    from evl_cache.ray_runtime import embedded_system_config

    monkeypatch.setenv("RAY_worker_niceness", "15")
    assert embedded_system_config() == {}
    monkeypatch.delenv("RAY_worker_niceness")
    assert embedded_system_config() == {"worker_niceness": 0}

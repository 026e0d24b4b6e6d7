"""Extraction across a real 2-node Ray cluster on this machine (loopback only).

The head is `ray start --head`; the second node is `ray start --address` with its own CPU and a
`node2` resource. Both are real raylets with their own object stores and workers. One test: a clean
run puts decode tasks and backbone actors on both nodes and writes the same bytes as a single-node
run; then the second node's fault, `embed@#2=kill-raylet` in its environment only, is armed (its
counting folder created), it loses its raylet during its actor's second batch, its work goes to the head,
and the store is still byte-identical.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_extract import TINY, make_dataset, tree_bytes
from test_ray_runtime import _listening

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
# Ray 2.60's `ray start --address` rewrites a loopback --address/--node-ip-address to the machine's
# outward IP (resolve_ip_for_localhost), so a second node on one machine would bind every interface.
# The same `ray start` command, with that rewrite off, keeps the node on 127.0.0.1.
JOIN = [sys.executable, "-c", "import sys; import ray._private.services as s; s.resolve_ip_for_localhost = lambda h: h; "
        "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
EVL = [sys.executable, "-m", "evl_cache.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent), RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="evlcache0multinode0test0token000")
    # Ray's default health check stays: tighter ones had the GCS declare a busy (live) head dead here.
    env.pop("EVL_CACHE_FAULT", None)
    env.update(extra)
    return env


class Node:
    """One `ray start --block` process (its own session, so stopping it stops the node's processes)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM `ray start --block` (it stops its children), then SIGKILL the process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def start_head(tmp: Path, port: int) -> Node:
    return Node([*RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                 "--temp-dir", str(tmp / "h"), "--include-dashboard", "false", "--dashboard-port", str(_free_port()),
                 "--disable-usage-stats", "--block"], tmp / "head.log", _env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))


def start_node2(tmp: Path, port: int, name: str, **env: str) -> Node:
    return Node([*JOIN, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                 "--resources", json.dumps({"node2": 1}), "--temp-dir", str(tmp / name), "--disable-usage-stats",
                 "--block"], tmp / f"{name}.log", _env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **env))


def extract_args(root: Path, csv_path: Path, store: Path, *extra: str) -> list[str]:
    return [*EVL, "extract", "--dataset", "list", "--root", str(root), "--annotations", str(csv_path),
            "--store", str(store), "--arch", TINY, "--weights", "random", "--seed", "3", "--frames", "4",
            "--stride", "2", "--views", "train:2", "--shard-size", "2", "--batch-size", "4", *extra]


def videos_per_node(stdout: str) -> dict[str, tuple[int, int]]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("videos per node: "))
    out = {}
    for part in line[len("videos per node: "):].split("; "):
        m = re.fullmatch(r"(.+): decoded (\d+), embedded (\d+)", part)
        out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_cluster_extracts_on_both_nodes_and_survives_losing_one(tmp_path):
    root = tmp_path / "data"
    csv_path = make_dataset(root, n_good=12)
    ref = tmp_path / "ref.zarr"
    started = time.monotonic()
    out = subprocess.run(extract_args(root, csv_path, ref, "--num-cpus", "2"), env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    single_s = time.monotonic() - started
    ray_tmp = Path(f"/tmp/evlmn-{os.getpid()}")  # Unix socket paths must stay short
    ray_tmp.mkdir(exist_ok=True)

    port = _free_port()
    before = _listening()
    nodes: list[Node] = []
    faults = tmp_path / "faults"  # created (arming the fault) only for the second run
    try:
        nodes.append(start_head(ray_tmp, port))
        nodes.append(start_node2(ray_tmp, port, "n2", EVL_CACHE_FAULT="embed@#2=kill-raylet",
                                 EVL_CACHE_FAULT_DIR=str(faults)))
        exposed = [(a, p) for a, p in _listening() - before if a not in ("127.0.0.1", "::1")]
        assert not exposed, f"the cluster listens beyond loopback: {exposed}"

        # 1. a clean run: tasks and actors on both nodes, the same bytes as one node
        started = time.monotonic()
        both = tmp_path / "both.zarr"
        out = subprocess.run(extract_args(root, csv_path, both, "--ray-address", f"127.0.0.1:{port}"), env=_env(),
                             capture_output=True, text=True, timeout=600)
        both_s = time.monotonic() - started
        assert out.returncode == 0, out.stderr[-3000:]
        assert "12/12 done" in out.stdout, out.stdout
        per_node = videos_per_node(out.stdout)
        assert len(per_node) == 2, out.stdout
        assert all(d > 0 and e > 0 for d, e in per_node.values()), out.stdout  # each node decoded and embedded
        assert sum(d for d, _ in per_node.values()) == 12 and sum(e for _, e in per_node.values()) == 12
        assert tree_bytes(both) == tree_bytes(ref)
        print(f"\nsingle node {single_s:.1f} s; two nodes {both_s:.1f} s: {per_node}", flush=True)

        # 2. armed: the second node's raylet is killed when its actor starts its second batch from now on
        faults.mkdir()
        started = time.monotonic()
        lost = tmp_path / "lost.zarr"
        out = subprocess.run(extract_args(root, csv_path, lost, "--ray-address", f"127.0.0.1:{port}"), env=_env(),
                             capture_output=True, text=True, timeout=600)
        lost_s = time.monotonic() - started
        assert out.returncode == 0, out.stderr[-3000:]
        assert "12/12 done, 0 failed" in out.stdout, out.stdout
        assert "nodes lost during the run: " in out.stdout, out.stdout  # the fault fired
        counted = [p for p in faults.iterdir()]
        assert counted and all(p.stat().st_size == 2 for p in counted)  # two batches started there, then the kill
        assert tree_bytes(lost) == tree_bytes(ref)
        print(f"node lost {lost_s:.1f} s:\n" + "\n".join(ln for ln in out.stdout.splitlines() if "node" in ln))
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_nth_call_fault_fires_once_on_the_counted_call(tmp_path, monkeypatch):
    """``POINT@#N`` fires on the N-th call under one parent process, counted in EVL_CACHE_FAULT_DIR."""
    from evl_cache.faults import InjectedFault, fault_point

    monkeypatch.setenv("EVL_CACHE_FAULT", "decode@#3=raise")
    monkeypatch.setenv("EVL_CACHE_FAULT_DIR", str(tmp_path))
    fault_point("decode", "a.mp4")
    fault_point("decode", "b.mp4")
    fault_point("other", "c.mp4")  # another point does not count
    with pytest.raises(InjectedFault, match="decode"):
        fault_point("decode", "c.mp4")
    fault_point("decode", "d.mp4")
    assert [p.stat().st_size for p in tmp_path.iterdir()] == [4]


def test_kill_raylet_outside_a_ray_worker_raises_instead_of_killing(monkeypatch):
    """Under pytest the parent is no raylet: the fault must not kill it."""
    from evl_cache.faults import InjectedFault, fault_point

    monkeypatch.setenv("EVL_CACHE_FAULT", "decode=kill-raylet")
    with pytest.raises(InjectedFault, match="outside a Ray worker"):
        fault_point("decode", "a.mp4")


def test_nth_call_fault_is_off_until_its_folder_exists(tmp_path, monkeypatch):
    from evl_cache.faults import InjectedFault, fault_point

    armed = tmp_path / "armed"
    monkeypatch.setenv("EVL_CACHE_FAULT", "decode@#1=raise")
    monkeypatch.setenv("EVL_CACHE_FAULT_DIR", str(armed))
    fault_point("decode", "a.mp4")  # not armed: no count, no fault
    armed.mkdir()
    with pytest.raises(InjectedFault):
        fault_point("decode", "b.mp4")

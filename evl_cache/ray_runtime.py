"""Starting or joining Ray safely: loopback only, no usage stats, a short temp dir.

Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import time; with it set to 0 an embedded Ray binds
every port to 127.0.0.1 (it otherwise listens on all interfaces). `evl_cache/__init__` sets it, so
this module only has to make sure ray was not imported before evl_cache.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

from evl_cache.errors import UserError


def _short_temp_dir() -> str:
    # Ray puts Unix sockets under its temp dir; their paths must stay under 108 bytes.
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    path = os.path.join(base, f"evlray-{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


# Ray starts its workers at nice 15 so that its own daemons stay responsive on a busy node. For an
# embedded Ray, the workers *are* the job: at nice 15 any other process on the machine (a training
# run, a test suite) starves them. Measured beside one training job on 2 cores: 10 videos took
# 250 s of wall time at nice 15 (the workers spent minutes importing torch at 5% CPU each) and 35 s
# at nice 0 (docs/benchmarks.md, "Extraction beside another job"). The user's RAY_worker_niceness
# wins. Ray applies the value as an increment, so 0 keeps the caller's own niceness.
EMBEDDED_WORKER_NICENESS = 0


def embedded_system_config() -> dict[str, object]:
    """Ray system settings of an embedded session: the workers at the caller's priority."""
    if "RAY_worker_niceness" in os.environ:
        return {}
    return {"worker_niceness": EMBEDDED_WORKER_NICENESS}


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[object]:
    """Start an embedded local Ray (or join ``address``) for the duration of the block.

    If Ray is already initialised by the caller (a notebook, a test), it is reused and left running.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise UserError("ray was imported before evl_cache with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset; import evl_cache first")
    import ray

    if ray.is_initialized():
        yield ray
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                num_gpus=num_gpus,
                include_dashboard=False,
                _temp_dir=_short_temp_dir(),
                _node_ip_address="127.0.0.1",
                _system_config=embedded_system_config(),
                log_to_driver=False,
                configure_logging=False,
            )
    except ConnectionError as err:
        raise UserError(f"cannot join Ray cluster at {address} ({err}); check --ray-address or drop it to run locally") from err
    try:
        yield ray
    finally:
        ray.shutdown()

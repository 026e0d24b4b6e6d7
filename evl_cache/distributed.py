"""Data-parallel training on the engines people already run: torch.distributed (torchrun) and Ray Train.

No process management lives here. Under ``torchrun`` each process finds its rank in the standard
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT) and `join` opens the process
group (gloo on CPU, nccl on CUDA). Under Ray Train's ``TorchTrainer`` the group is already open when
the training function starts, and `join` only reads it. Everything else (which items a rank reads,
how losses and evaluation results are combined, who writes the run directory) is described in
docs/distributed.md.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from evl_cache.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run; the default is the single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when `join` opened the group (torchrun), so `close` ends it

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes the run directory and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, pref: str | None) -> torch.device:
        """The device for ``pref`` (auto, cpu, cuda[:N]). With several ranks, CUDA without an explicit
        index means cuda:LOCAL_RANK, one GPU per process as torchrun lays them out."""
        from evl_cache.backbone import resolve_device

        dev = resolve_device(pref)
        if dev.type == "cuda" and self.active and (pref in (None, "", "auto", "cuda")):
            dev = torch.device("cuda", self.local_rank)
        return dev

    def all_mean_(self, value: torch.Tensor) -> torch.Tensor:
        """Replace ``value`` (same shape on every rank) by its mean over the ranks, in place."""
        if self.active:
            tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result to every rank; a `UserError` it raises is raised
        on every rank, so a refusal that only rank 0 can see (its run directory) stops all of them
        instead of leaving the others waiting in the next collective."""
        if not self.active:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except UserError as err:
                box[0] = ("error", str(err))
        tdist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise UserError(value)
        return value

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


SINGLE = Dist()


def env_world_size() -> int:
    """WORLD_SIZE as torchrun (or Ray Train) sets it; 1 when absent."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise UserError(f"WORLD_SIZE={raw!r} is not an integer; launch with torchrun, which sets it") from None


def join(device_pref: str | None) -> tuple[Dist, torch.device]:
    """This process's `Dist` and device: an already open process group (Ray Train, a notebook),
    the one torchrun's environment describes (opened here), or the single process."""
    if tdist.is_available() and tdist.is_initialized():
        ctx = Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group=False)
        device = ctx.device(device_pref)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return ctx, device
    world = env_world_size()
    if world == 1:
        return SINGLE, SINGLE.device(device_pref)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                        f"`torchrun --nproc-per-node N $(which evl-cache) train ...`")
    ctx = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), owns_group=True)
    device = ctx.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        tdist.init_process_group("nccl", device_id=device)
    else:
        tdist.init_process_group("gloo")
    return ctx, device


def rank_seed(*parts: int) -> int:
    """A 63-bit torch seed from integers (seed, rank, ...): independent streams per rank."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & (2**63 - 1)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of ``n`` items for ``rank``: concatenated in rank order they are 0..n-1."""
    return n * rank // world_size, n * (rank + 1) // world_size


# ------------------------------------------------------------------------------------ Ray Train


def train_on_ray(cfg: Any, out_dir: str | os.PathLike, *, workers: int, address: str | None = None,
                 gpus_per_worker: float = 0.0, resume: bool = False, until_step: int | None = None,
                 echo: Callable[[str], None] | None = None) -> Any:
    """Run `evl_cache.train.train` on ``workers`` Ray Train workers (``TorchTrainer``), returning the
    summary rank 0 wrote. Bad input is refused here, before Ray starts; the embedded Ray (no
    ``address``) listens on 127.0.0.1 only. With ``address`` on several nodes, ``out_dir`` and the
    stores must be paths every node sees (rank 0 may run on any node)."""
    from evl_cache.train import TrainSummary, preflight, split_batch

    if workers < 1:
        raise UserError(f"--ray-workers {workers} must be >= 1")
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker {gpus_per_worker} must be >= 0")
    if env_world_size() > 1 or (tdist.is_available() and tdist.is_initialized()):
        raise UserError("--ray-workers inside a torchrun job: use one launcher, torchrun or Ray Train, not both")
    cfg = cfg.validated()
    device = cfg.train.device
    if gpus_per_worker == 0 and device.startswith("cuda"):
        raise UserError(f"train.device={device} but --gpus-per-worker is 0; pass --gpus-per-worker 1 to train on GPUs")
    split_batch(cfg.train, workers)
    out = Path(out_dir).resolve()
    preflight(cfg, out, resume, echo)
    from evl_cache.ray_runtime import ray_session

    if address is None:
        # the embedded cluster is this machine alone: gloo's own sockets stay on loopback too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    num_cpus = None if address else max(workers, os.cpu_count() or 1)
    with ray_session(address, num_cpus=num_cpus):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        resources: dict[str, float] = {"CPU": 1}
        if gpus_per_worker:
            resources["GPU"] = gpus_per_worker
        with tempfile.TemporaryDirectory(prefix="evl-raytrain-") as storage:
            trainer = TorchTrainer(
                _ray_worker,
                train_loop_config={"cfg": cfg.to_dict(), "out": str(out), "resume": resume,
                                   "until_step": until_step, "gpus": gpus_per_worker},
                torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                             resources_per_worker=resources),
                run_config=RunConfig(name="evl-cache-train", storage_path=storage),
            )
            try:
                trainer.fit()
            except Exception as err:  # noqa: BLE001 - Ray wraps the workers' errors
                user = _user_error_in(err)
                if user is not None:
                    raise user from None
                raise
    summary = out / "summary.json"
    import json

    return TrainSummary(**json.loads(summary.read_text()))


def _ray_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the same `train` that torchrun runs, in the group Ray Train opened."""
    import ray.train.torch

    from evl_cache.config import RunConfig
    from evl_cache.train import train

    cfg = RunConfig.from_dict(config["cfg"])
    # Ray assigns the GPUs: take the device it gives this worker, never one of our own choosing
    cfg.train.device = str(ray.train.torch.get_device()) if config["gpus"] else "cpu"
    train(cfg, config["out"], resume=config["resume"], until_step=config["until_step"], progress=False)


def _user_error_in(err: BaseException) -> UserError | None:
    """The first `UserError` a Ray Train failure carries (worker failures, causes, Ray task errors)."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        failures = getattr(e, "worker_failures", None)  # Ray Train's WorkerGroupError: {rank: exception}
        if isinstance(failures, dict):
            todo.extend(failures.values())
        # RayTaskError keeps the worker's exception as .cause; ControllerError as .controller_failure
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__, getattr(e, "controller_failure", None)])
    return None

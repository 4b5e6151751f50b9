"""torch.distributed for a corpus run: set up only when launched by torchrun, and the devices of each rank.

Ranks never exchange tensors: each holds its own model and compresses its own documents (sharding.py). They talk
three times, with small Python objects: rank 0 sends the run's id and the listing's digest (every rank must see the
same corpus), and at the end, after a barrier, every rank sends its totals to rank 0 for the summary. Backend: gloo
on CPU; on CUDA "cpu:gloo,cuda:nccl", i.e. NCCL for CUDA tensors and gloo for these CPU-side objects (NCCL would
need each object copied to a GPU and a device bound to the group first).

The end barrier waits for the slowest rank, which may be busy with one long document for a while after the others
finish: its timeout is long (TIMEOUT). A rank that dies is noticed by torchrun, which stops the others.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from ..errors import CompactorError

TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class World:
    """This process's place in the run: global rank and size, rank and size on its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    initialized: bool = False  # a process group was set up (launched by torchrun)

    def broadcast(self, obj):
        """rank 0's `obj`, on every rank."""
        if not self.initialized:
            return obj
        box = [obj]
        with self._peers():
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj` (a list on every rank, index = rank)."""
        if not self.initialized:
            return [obj]
        out = [None] * self.size
        with self._peers():
            torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.initialized:
            with self._peers():
                torch.distributed.barrier()

    @contextlib.contextmanager
    def _peers(self):
        """A collective that fails because another rank is gone: one line instead of a backend traceback."""
        try:
            yield
        except RuntimeError as e:  # torch.distributed.DistBackendError and the like
            raise CompactorError(f"rank {self.rank}: another rank stopped before the end of the run "
                                 f"({str(e).strip().splitlines()[0][:120]}); run the same command again to "
                                 "finish (finished documents are skipped)") from None

    def close(self) -> None:
        if self.initialized:
            torch.distributed.destroy_process_group()
            self.initialized = False


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise CompactorError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init_world(cuda: bool) -> World:
    """The World of this process; under torchrun (WORLD_SIZE set) the default process group is created."""
    if not launched_by_torchrun():
        return World()
    world = World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0),
                  _env_int("LOCAL_WORLD_SIZE", 1))
    if not 0 <= world.rank < world.size or not 0 <= world.local_rank < world.local_size:
        raise CompactorError(f"inconsistent torchrun environment: RANK={world.rank} WORLD_SIZE={world.size} "
                             f"LOCAL_RANK={world.local_rank} LOCAL_WORLD_SIZE={world.local_size}")
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    world.initialized = True
    return world


def rank_gpus(world: World, gpu_count: int, per_rank: int | None = None) -> list[int]:
    """The GPUs of this rank on its host: its own (LOCAL_RANK) with one model per GPU, or with a model spread over
    several (per_rank=None: the host's GPUs split evenly among its ranks) a contiguous block of them."""
    if per_rank is None:
        per_rank = gpu_count // world.local_size
        if per_rank < 1:
            raise CompactorError(f"{world.local_size} ranks on this host but only {gpu_count} GPU(s): "
                                 "give --nproc-per-node at most the number of GPUs")
    first = world.local_rank * per_rank
    if first + per_rank > gpu_count:
        raise CompactorError(f"rank {world.rank} (local rank {world.local_rank}) needs GPU {first + per_rank - 1} "
                             f"but this host has {gpu_count}: give --nproc-per-node at most the number of GPUs")
    return list(range(first, first + per_rank))


ACCELERATE_MAPS = ("auto", "balanced", "sequential")


def read_device_map(text: str) -> str | dict:
    """--device-map: one of ACCELERATE_MAPS, or a JSON file {module name: device} ("" for the whole model; devices
    as transformers takes them: 0, "cuda:1", "cpu")."""
    if text in ACCELERATE_MAPS:
        return text
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(text).read_text())
    except FileNotFoundError:
        raise CompactorError(f"--device-map: expected {', '.join(ACCELERATE_MAPS)} or a JSON file; {text} does not "
                             "exist") from None
    except (OSError, ValueError) as e:
        raise CompactorError(f"--device-map file {text} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and (isinstance(v, str) or type(v) is int) for k, v in data.items()):
        raise CompactorError(f"--device-map file {text} must map module names to devices, e.g. "
                             '{"model.embed_tokens": 0, "model.layers.0": 0, "lm_head": 1}')
    return data


def placement(world: World, device: str, device_map: str | dict | None) -> dict:
    """load_model's device arguments for this rank: one model per GPU (cuda:LOCAL_RANK) or CPU process, or with a
    device map one model over this rank's block of the host's GPUs (all of them for one rank per host)."""
    if device_map is None:
        if device != "cuda":
            return {"device": device}
        gpu = rank_gpus(world, torch.cuda.device_count(), per_rank=1)[0]
        torch.cuda.set_device(gpu)
        return {"device": f"cuda:{gpu}"}
    if isinstance(device_map, dict):
        if world.local_size > 1:
            raise CompactorError("a device map file places one model on this host's devices: run one rank per host "
                                 "(--nproc-per-node 1), or use --device-map auto to split the GPUs among the ranks")
        return {"device_map": device_map}
    if not torch.cuda.is_available() or world.local_size == 1:
        return {"device_map": device_map}
    gpus = rank_gpus(world, torch.cuda.device_count())
    torch.cuda.set_device(gpus[0])
    return {"device_map": device_map, "max_memory": {g: torch.cuda.mem_get_info(g)[0] for g in gpus}}

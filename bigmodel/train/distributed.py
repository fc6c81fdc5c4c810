"""More than one process: DDP under `torchrun`, rank 0 the only writer.

`torchrun --standalone --nproc_per_node N -m bigmodel.cli pretrain` (what `bigmodel pretrain
--nproc N` launches) starts N processes with RANK, WORLD_SIZE and LOCAL_RANK in their
environment. `init` joins them into one process group (NCCL on CUDA, gloo on the CPU); outside
torchrun it returns the one-process `World()` and nothing here touches torch.distributed.

The rules every distributed stage follows:
- every rank runs the same steps on its own slice of each global batch (`World.share`), and
  DDP averages the gradients, so a step is the step one process would take on the whole batch;
- only rank 0 writes: checkpoints, final outputs, metrics files, MLflow runs;
- every rank resumes from the same checkpoint; checkpoints hold every rank's RNG states.

Two ways to spread the model (`pretrain.parallel`): `ddp` keeps a full replica in every process
and all-reduces gradients; `fsdp` (FSDP2, `torch.distributed.fsdp.fully_shard` on each
transformer block and then on the whole model) keeps 1/N of the parameters, gradients and AdamW
state in each process and gathers a block's weights only while it runs, for a model that does
not fit one device. Checkpoints are full state dicts either way, so a run saved under one
resumes under the other, or in one process.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from bigmodel.errors import BigModelError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: LOCAL_RANK picks it."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
        """The module a training step calls. One process: the model itself. `ddp`: DDP around
        the model (which stays the one to save and evaluate). `fsdp`: the model itself, sharded
        in place; its parameters become DTensors holding this rank's shard."""
        if not self.distributed:
            return model
        if parallel == "fsdp":
            shard(model, device)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def grad_sync(self, wrapped: nn.Module, sync: bool) -> AbstractContextManager:
        """Gradient accumulation: reduce gradients over the ranks on the last micro-step only
        (`sync`); the micro-steps before it accumulate locally."""
        if not self.distributed:
            return nullcontext()
        if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
            wrapped.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync else wrapped.no_sync()  # type: ignore[operator]

    def share(self, global_batch: int, key: str) -> int:
        """This rank's part of a global batch, which must split evenly."""
        if global_batch % self.size:
            raise BigModelError(f"{key} = {global_batch} does not split over {self.size} "
                                f"processes; use a multiple of {self.size}")
        return global_batch // self.size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, stacked: (world, *shape)."""
        if not self.distributed:
            return tensor[None]
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 over all ranks on `device`: every transformer block is one unit (its weights are
    gathered just before it runs and freed after), then the model itself (embeddings, final
    norm, head). Each unit moves to the device as it is sharded. Every rank must hold the same
    initial weights: the shards are cut from each rank's own copy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bigmodel.models.layers import Block

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise BigModelError(f"{type(model).__name__} has no transformer blocks to shard; "
                            f"use parallel: ddp")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def init(device_type: str) -> World:
    """Join the process group torchrun set up; the one-process World outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), size)
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo")
    return world


def shutdown(world: World, ok: bool) -> None:
    """Wait for every rank (when all went well: rank 0 may still be writing), then leave."""
    if not (world.distributed and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `bigmodel <argv>` in `nproc` processes, as `python -m torch.distributed.run
    --standalone --nproc_per_node nproc -m bigmodel.cli <argv>` would; return the exit code
    of the first rank that failed (2 for a user error), else 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([
        "--standalone", "--nproc_per_node", str(nproc),
        "--local-ranks-filter", "0",  # one copy of the console output, rank 0's
        "-m", "bigmodel.cli", *argv,
    ])
    try:
        run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items()) if f.exitcode]
        return next((c for c in codes if c > 0), 1)
    finally:
        sys.stdout.flush()
    return 0

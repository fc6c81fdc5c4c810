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
"""

from __future__ import annotations

import os
import sys
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

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model (which stays the one to save and evaluate); the model itself
        in a single process."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

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

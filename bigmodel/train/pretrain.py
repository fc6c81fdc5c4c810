"""Stage `pretrain`: a GPT trained with the causal-LM objective on the token shards.

Output: `paths.pretrain`/ model.safetensors + config.json (the final model) and checkpoint/
(what `--resume` continues from); metrics/pretrain.json; plots/pretrain_loss.csv.

Under torchrun (`bigmodel pretrain --nproc N`) every rank trains on its slice of each global batch
of `pretrain.batch_size` windows and rank 0 alone writes outputs and logs to MLflow.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, write_json
from bigmodel.models import gpt as gpt_lib
from bigmodel.tokenize import load_split
from bigmodel.train import distributed
from bigmodel.train.distributed import World
from bigmodel.train.trainer import (
    FitResult,
    History,
    Trainer,
    pick_device,
    seed_everything,
)

OUTPUTS = ("checkpoint", "model.safetensors", "config.json", "tokenizer.json", "registry.json")


class WindowSampler:
    """Random (x, y) windows from a memory-mapped token array; its generator state is the whole
    data position, so a resumed run draws exactly the batches it would have drawn.

    Each call draws the starts of a whole global batch of `batch_size` windows and reads this
    rank's slice of them, so the ranks see disjoint windows whose union is the batch one process
    would train on, and the position is the same on every rank (and for any world size)."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device, world: World | None = None):
        if len(data) <= block_size + 1:
            raise BigModelError(f"only {len(data)} tokens: need more than block_size + 1 "
                                f"({block_size + 1}); add data or lower pretrain.block_size")
        world = world or World()
        self.data, self.T, self.B, self.device = data, block_size, batch_size, device
        share = world.share(batch_size, "pretrain.batch_size")
        self.rows = slice(world.rank * share, (world.rank + 1) * share)
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.T - 1, (self.B,), generator=self.gen).numpy()
        starts = starts[self.rows]
        window = torch.from_numpy(self.data[starts[:, None] + self.offsets].astype(np.int64))
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]  # (B, T) inputs, (B, T) next-token targets


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model(x, y)[1]


def run(params: Params, resume: bool = False) -> str:
    world = distributed.init(pick_device(params.pretrain.device).type)  # from torchrun's env
    ok = False
    try:
        summary = train(params, resume, world)
        ok = True
        return summary
    finally:
        distributed.shutdown(world, ok)


def train(params: Params, resume: bool, world: World) -> str:
    cfg = params.pretrain
    # Every rank builds the model from the seed a single process uses (FSDP cuts each rank's
    # shard from its own copy); then the other ranks get their own dropout streams.
    seed_everything(params.seed)
    tokens_dir, out = params.path("tokens"), params.path("pretrain")
    train_data, meta = load_split(tokens_dir, "train")
    val_data, _ = load_split(tokens_dir, "val")
    val_split = meta["splits"]["val"]
    val_bytes_per_token = val_split["bytes"] / val_split["tokens"]

    gcfg = gpt_lib.GPTConfig(vocab_size=meta["vocab_size"], block_size=cfg.block_size,
                             n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                             dropout=cfg.dropout)
    model = gpt_lib.GPT(gcfg)
    if world.rank:
        seed_everything(params.seed + world.rank)
    trainer = Trainer(model, cfg, cfg.max_steps, world, cfg.parallel)
    sampler = WindowSampler(train_data, cfg.block_size, cfg.batch_size, params.seed,
                            trainer.device, world)
    val_sampler = WindowSampler(val_data, cfg.block_size, cfg.batch_size, params.seed + 1,
                                trainer.device)  # every rank scores the same whole batches
    val_batches = [val_sampler() for _ in range(cfg.eval_batches)]  # fixed: comparable over steps
    ckpt = out / "checkpoint"
    if world.is_main:
        remove_partial_writes(out)
    history = History(lambda values, step: None)
    if resume:
        state = trainer.load_checkpoint(ckpt)
        sampler.gen.set_state(state["sampler_rng"])
        history.rows = state.get("history", [])  # the plot keeps the curve from before the resume

    def evaluate() -> dict[str, float]:
        loss = torch.stack([lm_loss(model, b) for b in val_batches]).mean().item()
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / val_bytes_per_token}

    def checkpoint() -> None:
        trainer.save_checkpoint(ckpt, {"sampler_rng": sampler.gen.get_state(),
                                       "history": history.rows})

    with main_rank_run(world, params) as mlrun:
        if mlrun:
            mlrun.metrics({"n_params": model.num_params(), "train_tokens": len(train_data)})
            history.sink = mlrun.metrics
        result = trainer.fit(
            sampler, lm_loss,
            evaluate=evaluate, eval_interval=cfg.eval_interval,
            log=history, log_interval=cfg.log_interval,
            tokens_per_step=cfg.batch_size * cfg.block_size * cfg.grad_accum,
            flops_per_token=model.flops_per_token(),
            checkpoint=checkpoint, checkpoint_interval=cfg.checkpoint_interval,
        )
        final = trainer.full_model(lambda: gpt_lib.GPT(gcfg))  # gathers the shards under FSDP
        if not mlrun:
            return f"rank {world.rank}: step {result.step}"
        assert isinstance(final, gpt_lib.GPT)
        return publish(params, final, gcfg, result, history, mlrun)


@contextmanager
def main_rank_run(world: World, params: Params) -> Iterator[tracking.StageRun | None]:
    """The stage's MLflow run on rank 0; None on the other ranks, which log nothing."""
    if not world.is_main:
        yield None
        return
    with tracking.stage_run("pretrain", params, ["seed", "pretrain"]) as mlrun:
        yield mlrun


def publish(params: Params, model: gpt_lib.GPT, gcfg: gpt_lib.GPTConfig, result: FitResult,
            history: History, mlrun: tracking.StageRun) -> str:
    """Write the final model, metrics and plot; register the GPT (rank 0 only)."""
    out = params.path("pretrain")
    save_final(model, gcfg, out)
    with atomic_path(out / "tokenizer.json") as tmp:  # the model folder stands on its own
        shutil.copy(params.path("tokenizer") / "tokenizer.json", tmp)
    version = register_generator(mlrun, out, params.tracking.registered_generator)
    metrics = {
        "train_loss": result.train_loss,
        **result.eval_metrics,
        "tokens_per_s": result.tokens_per_s,
        "seconds": result.seconds,
        "steps": result.step,
        "n_params": model.num_params(),
    }
    write_json(params.metrics_file("pretrain"), metrics)
    history.write_csv(params.plot_file("pretrain_loss"), ["train_loss", "val_loss", "val_bpb"])
    mlrun.artifact(params.plot_file("pretrain_loss"), "plots")
    return (f"step {result.step}: train loss {result.train_loss:.3f}, val loss "
            f"{metrics['val_loss']:.3f}, val bpb {metrics['val_bpb']:.3f}, "
            f"{result.tokens_per_s:,.0f} tokens/s; registered "
            f"{params.tracking.registered_generator} v{version}")


def remove_partial_writes(out: Path) -> None:
    """Temporary folders a killed run left beside its outputs (see io.atomic_path)."""
    if out.is_dir():
        for name in OUTPUTS:
            for stale in out.glob(f".{name}.*"):
                shutil.rmtree(stale, ignore_errors=True)


def register_generator(mlrun: tracking.StageRun, out: Path, name: str) -> str:
    """Log weights, config and tokenizer (not the training checkpoint) as the servable GPT;
    note the registry version in the model folder."""
    with tempfile.TemporaryDirectory() as d:
        for file in ("model.safetensors", "config.json", "tokenizer.json"):
            shutil.copy(out / file, Path(d) / file)
        version = mlrun.log_generator(Path(d), name, example=["def read_config(path):"])
    write_json(out / "registry.json", {"name": name, "version": version, "run_id": mlrun.run_id})
    return version


def save_final(model: gpt_lib.GPT, gcfg: gpt_lib.GPTConfig, out: Path) -> None:
    """Replace the final model files atomically; the checkpoint folder beside them stays."""
    for name in ("model.safetensors", "config.json"):
        with atomic_path(out / name) as tmp:
            staging = tmp.parent / "stage"
            gpt_lib.save(model, gcfg, staging)
            (staging / name).rename(tmp)

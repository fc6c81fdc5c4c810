"""Stage `pretrain`: a GPT trained with the causal-LM objective on the token shards.

Output: `paths.pretrain`/ model.safetensors + config.json (the final model) and checkpoint/
(what `--resume` continues from); metrics/pretrain.json; plots/pretrain_loss.csv.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, write_json
from bigmodel.models import gpt as gpt_lib
from bigmodel.tokenize import load_split
from bigmodel.train.trainer import History, Trainer, seed_everything


class WindowSampler:
    """Random (x, y) windows from a memory-mapped token array; its generator state is the whole
    data position, so a resumed run draws exactly the batches it would have drawn."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device):
        if len(data) <= block_size + 1:
            raise BigModelError(f"only {len(data)} tokens: need more than block_size + 1 "
                                f"({block_size + 1}); add data or lower pretrain.block_size")
        self.data, self.T, self.B, self.device = data, block_size, batch_size, device
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.T - 1, (self.B,), generator=self.gen).numpy()
        window = torch.from_numpy(self.data[starts[:, None] + self.offsets].astype(np.int64))
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]  # (B, T) inputs, (B, T) next-token targets


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model(x, y)[1]


def run(params: Params, resume: bool = False) -> str:
    cfg = params.pretrain
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
    trainer = Trainer(model, cfg, cfg.max_steps)
    sampler = WindowSampler(train_data, cfg.block_size, cfg.batch_size, params.seed, trainer.device)
    val_sampler = WindowSampler(val_data, cfg.block_size, cfg.batch_size, params.seed + 1,
                                trainer.device)
    val_batches = [val_sampler() for _ in range(cfg.eval_batches)]  # fixed: comparable over steps
    ckpt = out / "checkpoint"
    if resume:
        state = trainer.load_checkpoint(ckpt)
        sampler.gen.set_state(state["sampler_rng"])

    def evaluate() -> dict[str, float]:
        loss = torch.stack([lm_loss(model, b) for b in val_batches]).mean().item()
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / val_bytes_per_token}

    with tracking.stage_run("pretrain", params, ["seed", "pretrain"]) as mlrun:
        mlrun.metrics({"n_params": model.num_params(), "train_tokens": len(train_data)})
        history = History(mlrun.metrics)
        result = trainer.fit(
            sampler, lm_loss,
            evaluate=evaluate, eval_interval=cfg.eval_interval,
            log=history, log_interval=cfg.log_interval,
            tokens_per_step=cfg.batch_size * cfg.block_size * cfg.grad_accum,
            flops_per_token=model.flops_per_token(),
            checkpoint=lambda: trainer.save_checkpoint(ckpt, {"sampler_rng": sampler.gen.get_state()}),
            checkpoint_interval=cfg.checkpoint_interval,
        )
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

"""Stage `pretrain@<run>`: a model of the run's family trained with the run's objective on the
run's token shards (the one trainer, bigmodel/train/trainer.py, for every family).

Output: `models/pretrain/<run>/` model.safetensors + config.json (family, task = objective,
architecture) + tokenizer.json (the final model, a folder that stands on its own);
`models/checkpoints/<run>/` (what `--resume` continues from: not a DVC output, so a retried
stage finds it); metrics/pretrain/<run>.json;
plots/pretrain/<run>.csv. A model whose task serves as it is (a causal LM: text generator; a
seq2seq model: text in, text out) is also logged to MLflow and registered as `bigmodel-<run>`.

Under torchrun (`bigmodel pretrain --nproc N`) every rank trains on its slice of each global batch
and rank 0 alone writes outputs and logs to MLflow.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch.nn as nn

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, recover, sha256_file, write_json
from bigmodel.models import registry
from bigmodel.stages import param_keys
from bigmodel.text import shards
from bigmodel.text.tokenizers import load as load_tokenizer, specials
from bigmodel.train import distributed
from bigmodel.train.distributed import World
from bigmodel.train.trainer import FitResult, History, Trainer, pick_device, seed_everything
from bigmodel.workspace import RESUME_ENV

# params a pretrain stage lists that do not change what it trains: a checkpoint stays resumable
NOT_TRAINING = ("tracking.model_prefix", "serving")
OUTPUTS = ("model.safetensors", "config.json", "tokenizer.json", "processor.json",
           "registry.json")


def run(params: Params, name: str, resume: bool = False) -> str:
    world = distributed.init(pick_device(params.pretrain[name].device).type)  # from torchrun's env
    ok = False
    try:
        summary = train(params, name, resume, world)
        ok = True
        return summary
    finally:
        distributed.shutdown(world, ok)


def train(params: Params, name: str, resume: bool, world: World) -> str:
    spec = params.pretrain[name]
    # Every rank builds the model from the seed a single process uses (FSDP cuts each rank's
    # shard from its own copy); then the other ranks get their own dropout streams.
    seed_everything(params.seed)
    tokens_dir, out = params.path("tokens", name), params.path("pretrain", name)
    meta = shards.read_meta(tokens_dir)
    tok_dir = params.path("tokenizer", spec.tokenizer)
    objective_mod = importlib.import_module(f"bigmodel.objectives.{spec.objective}")
    if meta.get("layout") == "images":  # a ResNet: the processor's shape and statistics
        from bigmodel.data.images import selected_labels

        inputs = "processor.json"
        labels = selected_labels(pd.DataFrame({"label": meta["labels"]}), spec.classes,
                                 f"pretrain.{name}.classes")
        arch = registry.arch_config(spec.family, image_arch(spec, meta, len(labels)))
        saved = {"labels": labels, "processor_sha256": meta["processor_sha256"]}
    else:
        inputs = "tokenizer.json"
        tok = load_tokenizer(tok_dir)
        sp = specials(tok)
        arch = registry.arch_config(spec.family, {**spec.model_dump(), "vocab_size": meta["vocab_size"],
                                                  "pad_id": sp.pad, "bos_id": sp.bos, "eos_id": sp.eot})
        saved = {"tokenizer_sha256": sha256_file(tok_dir / "tokenizer.json")}
        if meta.get("tokenizer_sha256", saved["tokenizer_sha256"]) != saved["tokenizer_sha256"]:
            raise BigModelError(f"{tokens_dir} was tokenized with another tokenizer than "
                                f"{tok_dir / 'tokenizer.json'}; rerun tokenize@{name}")
        train_units = meta["splits"]["train"]["tokens"]
    model = registry.build(spec.family, arch)
    if world.rank:
        seed_everything(params.seed + world.rank)
    trainer = Trainer(model, spec, spec.max_steps, world, spec.parallel, label=f"pretrain@{name}")
    if inputs == "processor.json":
        objective = objective_mod.make_pretrain(spec, tokens_dir, meta["labels"], labels,
                                                f"pretrain.{name}", params.seed, trainer.device,
                                                world)
        train_units = len(objective.train)
    else:
        objective = objective_mod.make(
            spec, shards.load(tokens_dir, "train"), shards.load(tokens_dir, "val"),
            sp, f"pretrain.{name}", params.seed, trainer.device, world)
    ckpt = params.path("checkpoints", name)
    if world.is_main:
        recover_outputs(out)
        recover_outputs(ckpt.parent, [name])
    world.barrier()
    identity = training_identity(params, name, tokens_dir)
    history = History(lambda values, step: None)
    if resume_from(ckpt, identity, resume, f"pretrain@{name}"):
        state = trainer.load_checkpoint(ckpt)
        objective.sampler.gen.set_state(state["sampler_rng"])
        history.rows = state.get("history", [])  # the plot keeps the curve from before the resume

    def checkpoint() -> None:
        trainer.save_checkpoint(ckpt, {"sampler_rng": objective.sampler.gen.get_state(),
                                       "history": history.rows, **identity})

    with main_rank_run(world, params, name) as mlrun:
        if mlrun:
            mlrun.metrics({"n_params": model.num_params(), f"train_{objective.unit}": train_units,
                           # training FLOPs a token (image): what the logged MFU divides by
                           f"flops_per_{objective.unit.removesuffix('s')}":
                               objective.flops_per_unit(model)})
            history.sink = mlrun.metrics
        result = trainer.fit(
            objective.next_batch, objective.loss,
            evaluate=lambda: objective.evaluate(model), eval_interval=spec.eval_interval,
            log=history, log_interval=spec.log_interval,
            tokens_per_step=objective.units_per_step, unit=objective.unit,
            flops_per_token=objective.flops_per_unit(model),
            checkpoint=checkpoint, checkpoint_interval=spec.checkpoint_interval,
        )
        final = trainer.full_model(lambda: registry.build(spec.family, arch))  # gathers FSDP shards
        if not mlrun:
            return f"rank {world.rank}: step {result.step}"
        assert final is not None
        task = importlib.import_module(f"bigmodel.tasks.{spec.objective}")
        extra = getattr(task, "saved_config", lambda spec: {})(spec)
        save_final(final, spec.family, spec.objective, arch, out, {**saved, **extra})
        with atomic_path(out / inputs) as tmp:  # the model folder stands on its own
            shutil.copy(tok_dir / inputs, tmp)
        return publish(params, name, final, result, history, mlrun, objective.unit)


def image_arch(spec: Any, meta: dict[str, Any], n_classes: int) -> dict[str, Any]:
    """A ResNet's config: its shape (a preset's block and layers, or the run's own), the label
    set, and the processor's side, channels and statistics (the model normalises itself)."""
    from bigmodel.models.resnet import PRESETS

    shape = dict(PRESETS[spec.preset]) if spec.preset else {"block": spec.block, "layers": spec.layers}
    return {**spec.model_dump(), **shape, "n_classes": n_classes,
            "in_channels": meta["channels"], "image_size": meta["size"], "mean": meta["mean"],
            "std": meta["std"]}


@contextmanager
def main_rank_run(world: World, params: Params, name: str) -> Iterator[tracking.StageRun | None]:
    """The stage's MLflow run on rank 0; None on the other ranks, which log nothing."""
    if not world.is_main:
        yield None
        return
    with tracking.stage_run(f"pretrain@{name}", params, param_keys(params, "pretrain", name)) as mlrun:
        yield mlrun


def publish(params: Params, name: str, model: nn.Module, result: FitResult, history: History,
            mlrun: tracking.StageRun, unit: str = "tokens") -> str:
    """Write metrics and plot; register the model when its task serves (rank 0 only)."""
    spec, out = params.pretrain[name], params.path("pretrain", name)
    registered = ""
    # a text generator or a seq2seq model serves as it is (its task has a predictor to `load`);
    # an MLM encoder is served through its finetunes
    if hasattr(importlib.import_module(f"bigmodel.tasks.{spec.objective}"), "load"):
        version = register(mlrun, out, params.registered_name(name), params.serving)
        registered = f"; registered {params.registered_name(name)} v{version}"
    metrics = {
        "train_loss": result.train_loss,
        **result.eval_metrics,
        f"{unit}_per_s": result.tokens_per_s,  # tokens, or target tokens (seq2seq)
        "seconds": result.seconds,
        "steps": result.step,
        "n_params": model.num_params(),
    }
    write_json(params.metrics_file("pretrain", name), metrics)
    columns = ["train_loss", *[k for k in result.eval_metrics]]
    history.write_csv(params.plot_file("pretrain", name), columns)
    mlrun.artifact(params.plot_file("pretrain", name), "plots")
    evals = ", ".join(f"{k} {v:.3f}" for k, v in result.eval_metrics.items())
    return (f"step {result.step}: train loss {result.train_loss:.3f}, {evals}, "
            f"{result.tokens_per_s:,.0f} {unit.replace('_', ' ')}/s{registered}")


def training_identity(params: Params, name: str, tokens_dir: Path) -> dict[str, Any]:
    """What a checkpoint is continued only with: the params its training depends on (those
    dvc.yaml lists for the stage but the registry's name and the served limits) and the token
    shards' hash."""
    keys = [k for k in param_keys(params, "pretrain", name) if k not in NOT_TRAINING]
    return {"params": {k: params.value(k) for k in keys},
            "data_sha256": sha256_file(tokens_dir / "meta.json")}


def resume_from(ckpt: Path, identity: dict[str, Any], asked: bool, label: str) -> bool:
    """Whether to continue from the checkpoint: asked to (`--resume`, or a retry by the flow,
    which sets BIGMODEL_RESUME=1) and there is one written for these params and this data.
    With none, training starts at step 0 (a run killed before its first checkpoint). One
    written for other params or data is refused under `--resume` (continuing it would train a
    model that no params describe) and replaced under a retry."""
    retry = os.environ.get(RESUME_ENV) == "1"
    if not (asked or retry):
        return False
    state_file = ckpt / "state.json"
    if not state_file.is_file():
        print(f"{label}: no checkpoint in {ckpt} yet; starting from step 0", flush=True)
        return False
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BigModelError(f"{state_file}: not a checkpoint's state ({e}); delete {ckpt} "
                            f"to start again") from None
    if "params" not in state:
        raise BigModelError(f"{ckpt}: written by an older bigmodel (no params recorded); delete "
                            f"it to start again")
    was, now = tracking.flatten(state["params"]), tracking.flatten(identity["params"])
    changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    reason = (f"params {', '.join(changed)} changed" if changed else
              "the token shards changed" if state.get("data_sha256") != identity["data_sha256"]
              else "")
    if not reason:
        print(f"{label}: resuming from the checkpoint at step {state['step']}", flush=True)
        return True
    if asked:
        raise BigModelError(f"{ckpt}: written before {reason}, so it cannot be continued; run "
                            f"without --resume to start again")
    print(f"{label}: the checkpoint in {ckpt} was written before {reason}; starting from step 0",
          flush=True)
    return False


def recover_outputs(out: Path, names: tuple[str, ...] | list[str] = OUTPUTS) -> None:
    """Finish or undo what a killed run left mid-write beside its outputs (io.recover): a
    checkpoint renamed aside for its successor comes back, temporary folders go."""
    if out.is_dir():
        for output in names:
            done = recover(out / output)
            if done:
                print(f"pretrain: {done} (in {out})", flush=True)


def register(mlrun: tracking.StageRun, out: Path, registered_name: str,
             limits: Any = None) -> str:
    """Log weights, config and tokenizer (not the training checkpoint) as the servable model;
    note the registry version in the model folder."""
    from bigmodel import serving

    with tempfile.TemporaryDirectory() as d:
        for file in ("model.safetensors", "config.json", "tokenizer.json", "processor.json"):
            if (out / file).is_file():
                shutil.copy(out / file, Path(d) / file)
        version = serving.log_model(mlrun, Path(d), registered_name, limits=limits)
    write_json(out / "registry.json", {"name": registered_name, "version": version,
                                       "run_id": mlrun.run_id})
    return version


def save_final(model: nn.Module, family: str, task: str, arch: Any, out: Path,
               extra: dict[str, Any]) -> None:
    """Replace the final model files atomically; the checkpoint folder beside them stays."""
    for file in ("model.safetensors", "config.json"):
        with atomic_path(out / file) as tmp:
            staging = tmp.parent / "stage"
            registry.save(model, staging, family, task, arch, extra)
            (staging / file).rename(tmp)

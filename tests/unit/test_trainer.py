import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bigmodel.config import Optim
from bigmodel.errors import BigModelError
from bigmodel.models.gpt import GPT, GPTConfig
from bigmodel.train.distributed import World
from bigmodel.objectives.clm import WindowSampler, lm_loss
from bigmodel.train import trainer as trainer_lib
from bigmodel.train.trainer import Trainer, lr_at
from tests.unit.crash import assert_resume_is_bitwise

CFG = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
OPT = Optim(lr=3e-2, min_lr=3e-3, warmup_steps=3, batch_size=4, device="cpu")
DATA = np.tile(np.arange(20, dtype=np.uint16), 50)  # a sequence a tiny model can memorise


def fit(trainer, sampler, log=None, checkpoint=None, interval=0, log_interval=1,  # noqa: ANN001, ANN201
        loss_fn=lm_loss):
    return trainer.fit(sampler, loss_fn, evaluate=lambda: {}, eval_interval=1000,
                       log=log or (lambda m, s: None), log_interval=log_interval,
                       tokens_per_step=32, checkpoint=checkpoint, checkpoint_interval=interval)


def saver(trainer, sampler, directory):  # noqa: ANN001, ANN201
    return lambda: trainer.save_checkpoint(directory, {"sampler_rng": sampler.gen.get_state()})


def fresh(max_steps: int) -> tuple[Trainer, WindowSampler]:
    torch.manual_seed(0)
    trainer = Trainer(GPT(CFG), OPT, max_steps)
    return trainer, WindowSampler(DATA, 8, 4, seed=1, device=trainer.device)


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    assert lr_at(0, OPT, 100) == pytest.approx(OPT.lr / 3)
    assert lr_at(2, OPT, 100) == pytest.approx(OPT.lr)
    assert lr_at(3, OPT, 100) == pytest.approx(OPT.lr)
    assert lr_at(100, OPT, 100) == pytest.approx(OPT.min_lr)
    mid = lr_at(3 + 97 // 2, OPT, 100)
    assert OPT.min_lr < mid < OPT.lr


def test_training_drives_the_loss_down():
    trainer, sampler = fresh(60)
    losses = []
    fit(trainer, sampler, log=lambda m, s: losses.append(m["train_loss"]))
    assert losses[0] > math.log(20) - 0.5
    assert losses[-1] < 0.5  # the repeating sequence is learnt


def test_resume_after_a_crash_reaches_the_same_weights_bitwise(tmp_path):
    assert_resume_is_bitwise(
        lambda: fresh(20),
        lambda trainer, sampler, draw, checkpoint: fit(trainer, draw, checkpoint=checkpoint,
                                                       interval=5 if checkpoint else 0),
        tmp_path / "ckpt", crash_at=14, resumed_step=10)


def test_resume_inside_a_log_window_logs_the_same_losses_and_restores_every_rng(tmp_path):
    full, sampler = fresh(20)
    want: list = []
    fit(full, sampler, log=lambda m, s: want.append((s, m["train_loss"])), log_interval=4)

    crashed, sampler = fresh(20)
    ckpt = tmp_path / "ckpt"
    save = saver(crashed, sampler, ckpt)

    def save_then_draw():  # noqa: ANN202
        save()
        snapshot["draws"] = (torch.rand(3), np.random.rand(3), random.random())

    def killed_in_step_9():  # noqa: ANN202
        if crashed.step == 8:
            raise KeyboardInterrupt("killed")
        return sampler()

    snapshot: dict = {}
    with pytest.raises(KeyboardInterrupt):  # the last checkpoint: step 5
        fit(crashed, killed_in_step_9, checkpoint=save_then_draw, interval=5, log_interval=4)

    resumed, sampler = fresh(20)
    random.seed(99)
    np.random.seed(99)
    state = resumed.load_checkpoint(ckpt)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], snapshot["draws"][0])
    assert np.array_equal(draws[1], snapshot["draws"][1]) and draws[2] == snapshot["draws"][2]
    assert (resumed.step, resumed.window_start) == (5, 4)  # steps 5.. of the window 5-8 pending
    sampler.gen.set_state(state["sampler_rng"])
    got: list = []
    fit(resumed, sampler, log=lambda m, s: got.append((s, m["train_loss"])), log_interval=4)
    assert got == want[1:]  # (8, loss over steps 5-8) and on: bitwise the same numbers


def test_a_nan_between_logs_stops_the_checkpoint_and_keeps_the_last_good_one(tmp_path):
    trainer, sampler = fresh(30)
    ckpt = tmp_path / "ckpt"

    def poisoned(model, batch):  # noqa: ANN001, ANN202
        return lm_loss(model, batch) * (float("nan") if trainer.step >= 12 else 1.0)

    with pytest.raises(BigModelError) as err:  # step 13 is the first bad one; no log before 15
        fit(trainer, sampler, checkpoint=saver(trainer, sampler, ckpt), interval=5,
            log_interval=100, loss_fn=poisoned)
    assert str(err.value) == ("training diverged: loss is nan at step 13 (lower the learning "
                              f"rate); the last good checkpoint (step 10) is kept in {ckpt}")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 10
    assert all(w.isfinite().all() for w in load_file(ckpt / "model.safetensors").values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    trainer, sampler = fresh(30)
    ckpt = tmp_path / "ckpt"

    def corrupt(optimizer, args, kwargs):  # noqa: ANN001, ANN202 - after step 7's update
        if trainer.step == 6:
            with torch.no_grad():
                trainer.model.wpe.weight[0, 0] = float("inf")

    trainer.optimizer.register_step_post_hook(corrupt)
    with pytest.raises(BigModelError, match=r"weights are not finite at step 10 .*\(step 5\)"):
        fit(trainer, sampler, checkpoint=saver(trainer, sampler, ckpt), interval=5,
            log_interval=100, loss_fn=lambda m, b: lm_loss(m, b) if trainer.step < 7 else
            lm_loss(m, b).nan_to_num())  # a loss that hides it: only the weights tell
    assert json.loads((ckpt / "state.json").read_text())["step"] == 5


def test_ranks_split_each_global_batch_and_together_draw_the_single_process_batch():
    single = WindowSampler(DATA, 8, 4, seed=1, device=torch.device("cpu"))
    ranks = [WindowSampler(DATA, 8, 4, seed=1, device=torch.device("cpu"), world=World(r, r, 2))
             for r in range(2)]
    for _ in range(3):
        x, y = single()
        parts = [r() for r in ranks]
        assert [p[0].shape[0] for p in parts] == [2, 2]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(BigModelError, match="batch_size = 4 does not split over 3 processes"):
        WindowSampler(DATA, 8, 4, seed=1, device=torch.device("cpu"), world=World(0, 0, 3))


def test_a_diverging_run_stops_with_a_clear_error():
    trainer, sampler = fresh(10)
    with pytest.raises(BigModelError, match="loss is nan at step 1"):
        trainer.fit(sampler, lambda m, b: lm_loss(m, b) * float("nan"), evaluate=lambda: {},
                    eval_interval=100, log=lambda m, s: None, log_interval=1, tokens_per_step=32)


def test_asking_for_cuda_without_one_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BigModelError, match="no CUDA device"):
        Trainer(GPT(CFG), Optim(device="cuda"), 1)


def test_a_checkpoint_stores_the_tied_matrix_once_and_loads_as_a_plain_model(tmp_path):
    from bigmodel.models.registry import load_weights

    trainer, sampler = fresh(3)
    fit(trainer, sampler, checkpoint=saver(trainer, sampler, tmp_path / "ckpt"), interval=3)
    stored = load_file(tmp_path / "ckpt/model.safetensors")
    assert "wte.weight" in stored and "lm_head.weight" not in stored
    plain = GPT(CFG)
    load_weights(plain, tmp_path / "ckpt")  # strict: every parameter, nothing extra
    assert plain.lm_head.weight is plain.wte.weight
    assert torch.equal(plain.wte.weight, trainer.model.wte.weight.detach())


def test_a_checkpoint_from_before_named_optimizer_state_is_refused_in_one_line(tmp_path):
    trainer, sampler = fresh(3)
    ckpt = tmp_path / "ckpt"
    fit(trainer, sampler, checkpoint=saver(trainer, sampler, ckpt), interval=3)
    blob = torch.load(ckpt / "trainer.pt", weights_only=True)
    blob["optimizer"] = trainer.optimizer.state_dict()  # the old layout: state keyed 0, 1, ...
    torch.save(blob, ckpt / "trainer.pt")
    with pytest.raises(BigModelError, match="written by an older bigmodel"):
        fresh(3)[0].load_checkpoint(ckpt)


def test_a_log_interval_after_an_evaluation_counts_training_time_only():
    import time

    trainer, sampler = fresh(20)
    rates: dict[int, float] = {}

    def slow_eval() -> dict:
        if trainer.step == 10:
            time.sleep(3.0)  # far longer than 5 steps of this model, even on a loaded machine
        return {}

    trainer.fit(sampler, lm_loss, evaluate=slow_eval, eval_interval=10,
                log=lambda m, s: rates.update({s: m["tokens_per_s"]}) if "tokens_per_s" in m else None,
                log_interval=5, tokens_per_step=32)
    # steps 11-15 come after the evaluation at step 10: the time their tokens/s implies is the
    # steps' own, not the 3 s evaluation's
    assert 5 * 32 / rates[15] < 1.5


def test_device_selection_and_the_peak_flops_table(monkeypatch):
    from bigmodel.train.trainer import peak_flops, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert peak_flops(torch.device("cpu")) is None  # no MFU on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("cpu") == torch.device("cpu")  # asked for, even beside a GPU
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
                       ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda")) == peak


# --- precision: bf16 weights and activations with an fp32 master on the CPU -------------------

BF16 = Optim(**{**OPT.model_dump(), "precision": "bf16"})


def bf16_fresh(monkeypatch, max_steps: int):  # noqa: ANN001, ANN201
    # the path is forced on whatever CPU runs the test: without native bf16 units it is only
    # slower, not different
    monkeypatch.setattr(trainer_lib, "cpu_has_bf16", lambda: True)
    torch.manual_seed(0)
    trainer = Trainer(GPT(CFG), BF16, max_steps)
    return trainer, WindowSampler(DATA, 8, 4, seed=1, device=trainer.device)


def test_bf16_master_trains_a_bf16_copy_and_keeps_fp32_weights_that_learn(monkeypatch):
    trainer, sampler = bf16_fresh(monkeypatch, 60)
    assert trainer.precision == "bf16-master"
    assert trainer.compute is not trainer.model
    assert {p.dtype for p in trainer.compute.parameters()} == {torch.bfloat16}
    losses = []
    fit(trainer, sampler, log=lambda m, s: losses.append(m["train_loss"]))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert losses[-1] < 0.5  # the repeating sequence is learnt, as in fp32
    # the copy holds the master's weights, rounded: what the next step will compute with
    for master, low in zip(trainer.model.parameters(), trainer.compute.parameters()):
        assert torch.equal(low, master.to(torch.bfloat16))
    # the tied matrix stays one parameter in both
    assert trainer.compute.lm_head.weight is trainer.compute.wte.weight
    # the step's gradients are the master's; none is left on the copy
    assert all(p.grad is None for p in trainer.compute.parameters())


def test_bf16_master_takes_the_steps_fp32_takes_up_to_rounding(monkeypatch):
    start = [p.detach().clone() for p in fresh(5)[0].model.parameters()]
    low, sampler_low = bf16_fresh(monkeypatch, 5)
    fit(low, sampler_low)
    full, sampler_full = fresh(5)
    fit(full, sampler_full)
    moved_low = torch.cat([(p.detach() - s).flatten() for p, s in zip(low.model.parameters(), start)])
    moved_full = torch.cat([(p.detach() - s).flatten() for p, s in zip(full.model.parameters(), start)])
    assert not torch.equal(moved_low, moved_full)  # bf16 products are not fp32's
    assert torch.cosine_similarity(moved_low, moved_full, dim=0) > 0.9  # but the same updates
    assert moved_low.norm().item() == pytest.approx(moved_full.norm().item(), rel=0.1)


def test_bf16_master_resumes_bitwise(tmp_path, monkeypatch):
    assert_resume_is_bitwise(
        lambda: bf16_fresh(monkeypatch, 20),
        lambda trainer, sampler, draw, checkpoint: fit(trainer, draw, checkpoint=checkpoint,
                                                       interval=5 if checkpoint else 0),
        tmp_path / "ckpt", crash_at=14, resumed_step=10)


def test_bf16_master_checkpoints_fp32_weights(tmp_path, monkeypatch):
    trainer, sampler = bf16_fresh(monkeypatch, 3)
    fit(trainer, sampler)
    trainer.save_checkpoint(tmp_path / "ckpt", {})
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert torch.equal(saved["wte.weight"], trainer.model.wte.weight.detach())


def test_bf16_master_gradients_arrive_in_fp32_clipped_as_clip_grad_norm_clips_them(monkeypatch):
    trainer, sampler = bf16_fresh(monkeypatch, 3)
    assert trainer.cfg.grad_clip == 1.0
    lm_loss(trainer.compute, sampler()).mul(100).backward()  # a norm well above the clip
    stand_ins = []  # torch's clip_grad_norm_, on copies of the same fp32 gradients
    for _, low in trainer.pairs:
        stand_ins.append(torch.nn.Parameter(torch.empty_like(low, dtype=torch.float32)))
        stand_ins[-1].grad = low.grad.float()
    assert torch.nn.utils.clip_grad_norm_(stand_ins, 1.0) > 10
    expected = [p.grad for p in stand_ins]
    assert trainer._grads_to_master() is True
    for (master, low), want in zip(trainer.pairs, expected, strict=True):
        assert low.grad is None and master.grad.dtype == torch.float32
        assert torch.allclose(master.grad, want, rtol=1e-5, atol=1e-9)
    got = torch.cat([m.grad.flatten() for m, _ in trainer.pairs]).norm()
    assert got.item() == pytest.approx(1.0, rel=1e-5)


def test_bf16_master_leaves_a_parameter_without_a_gradient_untouched(monkeypatch):
    monkeypatch.setattr(trainer_lib, "cpu_has_bf16", lambda: True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    before = [p.detach().clone() for p in net.parameters()]
    trainer = Trainer(net, BF16, 3)
    x = torch.randn(16, 4)
    trainer.fit(lambda: x, lambda model, batch: model[0](batch.bfloat16()).float().pow(2).mean(),
                evaluate=dict, eval_interval=1000, log=lambda m, s: None, log_interval=1,
                tokens_per_step=16, progress=False)
    moved = [not torch.equal(p, b) for p, b in zip(net.parameters(), before)]
    assert moved == [True, True, False, False]  # no gradient: no step, no weight decay either
    assert all(not trainer.optimizer.state[p] for p in list(net.parameters())[2:])


def test_bf16_master_carries_batch_norm_statistics_back_to_the_master(monkeypatch):
    monkeypatch.setattr(trainer_lib, "cpu_has_bf16", lambda: True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    trainer = Trainer(net, BF16, 3)
    x = torch.randn(16, 4) * 3 + 1
    trainer.fit(lambda: x, lambda model, batch: model(batch).float().pow(2).mean(),
                evaluate=dict, eval_interval=1000, log=lambda m, s: None, log_interval=1,
                tokens_per_step=16, progress=False)
    master_bn, low_bn = trainer.model[1], trainer.compute[1]
    assert int(master_bn.num_batches_tracked) == 3
    assert torch.equal(master_bn.running_mean, low_bn.running_mean.float())
    assert master_bn.running_mean.abs().sum() > 0  # moved from its initial zeros


def test_precision_falls_back_to_fp32_where_bf16_would_be_slow_or_unsupported(monkeypatch, capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert trainer_lib.resolve_precision("auto", cpu, False) == "fp32"
    assert trainer_lib.resolve_precision("fp32", cpu, False) == "fp32"
    assert trainer_lib.resolve_precision("auto", cuda, False) == "bf16-autocast"
    assert trainer_lib.resolve_precision("bf16", cuda, True) == "bf16-autocast"
    assert trainer_lib.resolve_precision("fp32", cuda, False) == "fp32"
    monkeypatch.setattr(trainer_lib, "cpu_has_bf16", lambda: False)
    assert trainer_lib.resolve_precision("bf16", cpu, False) == "fp32"
    assert "no native bf16 units" in capsys.readouterr().out
    monkeypatch.setattr(trainer_lib, "cpu_has_bf16", lambda: True)
    assert trainer_lib.resolve_precision("bf16", cpu, False) == "bf16-master"
    assert trainer_lib.resolve_precision("bf16", cpu, True) == "fp32"
    assert "one process only" in capsys.readouterr().out


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    flags = tmp_path / "cpuinfo"
    real_read = trainer_lib.Path.read_text

    def read(path, *a, **k):  # noqa: ANN001, ANN202
        return real_read(flags if str(path) == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(trainer_lib.Path, "read_text", read)
    flags.write_text("flags\t\t: fpu avx512f avx512bw\n")
    assert trainer_lib.cpu_has_bf16() is False
    flags.write_text("flags\t\t: fpu avx512f avx512_bf16 avx512bw\n")
    assert trainer_lib.cpu_has_bf16() is True
    flags.write_text("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert trainer_lib.cpu_has_bf16() is True

import math

import numpy as np
import pytest
import torch

from bigmodel.config import Optim
from bigmodel.errors import BigModelError
from bigmodel.models.gpt import GPT, GPTConfig
from bigmodel.train.pretrain import WindowSampler, lm_loss
from bigmodel.train.trainer import Trainer, lr_at

CFG = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
OPT = Optim(lr=3e-2, min_lr=3e-3, warmup_steps=3, batch_size=4, device="cpu")
DATA = np.tile(np.arange(20, dtype=np.uint16), 50)  # a sequence a tiny model can memorise


def fit(trainer, sampler, log=None, checkpoint=None, interval=0):  # noqa: ANN001, ANN201
    return trainer.fit(sampler, lm_loss, evaluate=lambda: {}, eval_interval=1000,
                       log=log or (lambda m, s: None), log_interval=1, tokens_per_step=32,
                       checkpoint=checkpoint, checkpoint_interval=interval)


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
    full, sampler = fresh(20)
    fit(full, sampler)

    crashed, sampler = fresh(20)
    calls = {"n": 0}

    def flaky():  # noqa: ANN202
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt("killed")
        return sampler()

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(crashed, flaky, checkpoint=lambda: crashed.save_checkpoint(
            ckpt, {"sampler_rng": sampler.gen.get_state()}), interval=5)

    resumed, sampler = fresh(20)
    state = resumed.load_checkpoint(ckpt)
    sampler.gen.set_state(state["sampler_rng"])
    assert resumed.step == 10
    fit(resumed, sampler)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


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

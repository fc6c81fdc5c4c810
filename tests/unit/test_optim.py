import subprocess
import sys
import textwrap

import pytest
import torch

from bigmodel.train.optim import EagerAdamW


def model_and_groups(seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    ps = list(net.parameters())
    return net, [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                 {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


def train(net, opt, steps: int, seed: int = 1) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (i + 1) / steps  # the trainer sets the LR per step likewise
        net(torch.randn(4, 8, generator=gen)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_eager_adamw_takes_torchs_fused_adamw_steps_bitwise_and_shares_its_state():
    ours, groups = model_and_groups()
    opt = EagerAdamW(groups, lr=1e-2, betas=(0.9, 0.95), fused=True)
    theirs, their_groups = model_and_groups()
    ref = torch.optim.AdamW(their_groups, lr=1e-2, betas=(0.9, 0.95), fused=True)
    train(ours, opt, 5)
    train(theirs, ref, 5)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), model_and_groups()[0].parameters()))
    # either one's state continues in the other, step for step
    mine, theirs_state = opt.state_dict(), ref.state_dict()
    assert mine["param_groups"] == theirs_state["param_groups"]
    assert float(mine["state"][0]["step"]) == 5.0
    opt.load_state_dict(theirs_state)
    ref.load_state_dict(mine)
    train(ours, opt, 3, seed=2)
    train(theirs, ref, 3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_eager_adamw_follows_which_parameters_have_gradients_and_their_state_step_by_step():
    # a parameter without a gradient is skipped (no step, no decay), and state replaced from
    # outside is the state stepped, as in torch's
    ours, groups = model_and_groups()
    opt = EagerAdamW(groups, lr=1e-2, betas=(0.9, 0.95), fused=True)
    theirs, their_groups = model_and_groups()
    ref = torch.optim.AdamW(their_groups, lr=1e-2, betas=(0.9, 0.95), fused=True)
    for i, without in enumerate([None, 0, None, 4, 4, None, None]):
        for net, o in ((ours, opt), (theirs, ref)):
            net(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).pow(2).sum().backward()
            if without is not None:  # a parameter that took no part in this step
                list(net.parameters())[without].grad = None
            if i == 5:  # state replaced from outside, as a restore might
                first = list(net.parameters())[2]
                o.state[first]["exp_avg"] = o.state[first]["exp_avg"].clone()
            o.step()
            o.zero_grad(set_to_none=True)
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters())), i
    steps = [float(opt.state[p]["step"]) for p in ours.parameters()]
    assert steps == [6.0, 7.0, 7.0, 7.0, 5.0, 7.0]
    mine, their_state = opt.state_dict()["state"], ref.state_dict()["state"]
    assert all(torch.equal(mine[i][k], their_state[i][k]) for i in their_state
               for k in ("step", "exp_avg", "exp_avg_sq"))  # what a checkpoint saves


def test_eager_adamw_refuses_what_it_does_not_do():
    net, groups = model_and_groups()
    with pytest.raises(ValueError, match="fused=True"):
        EagerAdamW(groups, lr=1e-2)
    opt = EagerAdamW(groups, lr=1e-2, fused=True)
    with pytest.raises(ValueError, match="no closure"):
        opt.step(lambda: 0.0)


def test_an_eager_training_process_never_imports_the_compiler():
    # a tiny GPT trained, checkpointed and resumed through the Trainer, in a fresh process
    script = textwrap.dedent("""
        import sys, tempfile
        from pathlib import Path
        import numpy as np, torch
        from bigmodel.config import Optim
        from bigmodel.models.gpt import GPT, GPTConfig
        from bigmodel.objectives.clm import WindowSampler, lm_loss
        from bigmodel.train.trainer import Trainer
        cfg = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
        opt = Optim(lr=3e-2, min_lr=3e-3, warmup_steps=3, batch_size=4, device="cpu",
                    precision=sys.argv[1])
        data = np.tile(np.arange(20, dtype=np.uint16), 50)
        trainer = Trainer(GPT(cfg), opt, 4)
        sampler = WindowSampler(data, 8, 4, seed=1, device=trainer.device)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            trainer.fit(sampler, lm_loss, evaluate=lambda: {}, eval_interval=1000,
                        log=lambda m, s: None, log_interval=1, tokens_per_step=32,
                        checkpoint=lambda: trainer.save_checkpoint(d, {}), checkpoint_interval=2)
            trainer.load_checkpoint(d)
        print("torch._dynamo" in sys.modules, type(trainer.optimizer).__name__)
    """)
    for precision in ("fp32", "auto"):
        out = subprocess.run([sys.executable, "-c", script, precision], capture_output=True,
                             text=True, check=True)
        assert out.stdout.split()[-2:] == ["False", "EagerAdamW"], out.stdout + out.stderr


def test_an_unsharded_checkpoint_state_is_what_torch_distributed_checkpoint_gives():
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from bigmodel.config import Optim
    from bigmodel.models.gpt import GPT, GPTConfig
    from bigmodel.train.trainer import Trainer, load_named_state, named_state

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)  # tied head
    trainer = Trainer(GPT(cfg), Optim(lr=1e-2, batch_size=2, device="cpu", precision="fp32"), 2)
    trainer.model(torch.randint(0, 20, (2, 8)))[0].sum().backward()
    trainer.optimizer.step()
    weights, optim = named_state(trainer.model, trainer.optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    want_w = get_model_state_dict(trainer.model, options=options)
    want_o = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)
    assert list(weights) == list(want_w) and all(torch.equal(weights[k], want_w[k]) for k in want_w)
    assert optim["param_groups"] == want_o["param_groups"]
    assert list(optim["state"]) == list(want_o["state"])
    for name, state in want_o["state"].items():
        assert all(torch.equal(state[k], optim["state"][name][k]) for k in state)
    # and it loads back into a fresh model and optimizer as the same state
    other = Trainer(GPT(cfg), Optim(lr=1e-2, batch_size=2, device="cpu", precision="fp32"), 2)
    load_named_state(other.model, other.optimizer, weights, optim)
    again_w, again_o = named_state(other.model, other.optimizer)
    assert all(torch.equal(again_w[k], weights[k]) for k in weights)
    assert again_o["param_groups"] == optim["param_groups"]
    optim["param_groups"][0]["params"].pop()
    with pytest.raises(Exception, match="other parameters than the model's"):
        load_named_state(other.model, other.optimizer, weights, optim)

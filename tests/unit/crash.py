"""One check three families share: a run killed mid-way and resumed from its last checkpoint
ends with the weights of the run that never stopped, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


def assert_resume_is_bitwise(fresh: Callable[[], tuple[Any, Any]],
                             fit: Callable[..., Any], ckpt: Path, crash_at: int,
                             resumed_step: int) -> None:
    """`fresh()` → (trainer, sampler), both newly seeded; `fit(trainer, sampler, draw,
    checkpoint)` trains to the end drawing batches from `draw`, calling `checkpoint` at its
    interval. The second run is killed at its `crash_at`-th batch; the third resumes from
    the checkpoint (at `resumed_step`) and must end where the first did."""
    full, sampler = fresh()
    fit(full, sampler, sampler, None)
    crashed, sampler = fresh()
    calls = {"n": 0}

    def flaky() -> Any:
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("killed")
        return sampler()

    with pytest.raises(KeyboardInterrupt):
        fit(crashed, sampler, flaky,
            lambda: crashed.save_checkpoint(ckpt, {"sampler_rng": sampler.gen.get_state()}))
    resumed, sampler = fresh()
    sampler.gen.set_state(resumed.load_checkpoint(ckpt)["sampler_rng"])
    assert resumed.step == resumed_step
    fit(resumed, sampler, sampler, None)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)

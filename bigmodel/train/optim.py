"""torch's fused AdamW, stepped without importing torch's compiler.

torch.optim imports torch._dynamo (the compiler, about 70 MB resident and a second of start-up,
benchmarks/RESULTS.md) the first time an optimizer adds a parameter group, takes a step or saves
its state: `Optimizer.step` calls `torch._dynamo.graph_break()` on every step, and the methods
it marks "not to be traced" build that marker from torch._dynamo on their first call, caching
it on the marked function as `__dynamo_disable`. A process that compiles nothing reads neither.

`EagerAdamW` is `torch.optim.AdamW(fused=True)` with the same state, state_dict and kernel
(`torch._fused_adamw_`: the update is bitwise the same, tests/unit/test_optim.py); only its step
is called directly, and the markers' caches are filled with the functions themselves (which is
what they stand for outside a compiled region). The Trainer uses it for eager single-process
runs; a compiled or distributed run uses torch's AdamW as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

_MARKED_IN = ("torch.optim.optimizer", "torch.optim.adam", "torch.optim.adamw")


def skip_compiler_markers() -> None:
    """Fill each "not to be traced" marker's cache with its own function (see above); a torch
    whose markers look different is left as it is."""
    for module in map(importlib.import_module, _MARKED_IN):
        owners = [module, *(v for v in vars(module).values()
                            if isinstance(v, type) and issubclass(v, torch.optim.Optimizer))]
        for owner in owners:
            for value in list(vars(owner).values()):
                fn = getattr(value, "__wrapped__", None)
                if callable(fn) and not hasattr(fn, "__dynamo_disable"):
                    setattr(fn, "__dynamo_disable", fn)


class EagerAdamW(torch.optim.AdamW):
    """AdamW with fused=True, for eager runs: see the module's docstring."""

    def __init__(self, params, **kwargs) -> None:  # noqa: ANN001
        if not kwargs.get("fused"):
            raise ValueError("EagerAdamW is the fused AdamW: pass fused=True")
        skip_compiler_markers()
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("EagerAdamW takes no closure")
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            max_exp_avg_sqs: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            if not params:
                continue
            if len({(p.device, p.dtype) for p in params}) > 1:
                raise ValueError("EagerAdamW: a parameter group spans devices or dtypes")
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                grad_scale=None, found_inf=None,
            )

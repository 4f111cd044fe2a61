"""Base class: a plain ``torch.optim.Optimizer`` whose groups are validated and may carry FD forms.

Half-precision parameters (float16 / bfloat16, e.g. fairseq's ``--memory-efficient-fp16``) are updated in float32:
the moments are float32, the update (and decoupled FD, float32 from the half factors by the core's rule) is
computed on a float32 working copy of the parameter, and the result is rounded into the parameter once.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from ._fd import check_common, check_fd_group, check_unique, fd_active

HALF_DTYPES = (torch.float16, torch.bfloat16)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """dtype of a parameter's moments and of its working copy: float32 for half precision, else its own."""
    return torch.float32 if p.dtype in HALF_DTYPES else p.dtype


def working_copy(w: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a half-precision parameter to update (the parameter itself otherwise)."""
    return w.to(state_dtype(w))


def write_back(w: torch.Tensor, w32: torch.Tensor) -> None:
    """Round an updated working copy into its parameter (nothing to do when it is the parameter)."""
    if w32 is not w:
        w.copy_(w32)


class FDOptimizer(Optimizer):
    """``add_param_group`` checks every group (clear errors, nothing clamped) before it is used.

    Subclasses set ``supports_fd`` and implement ``check_group(group, index)`` for their own options.
    """

    supports_fd = True
    supports_memory_efficient_fp16 = True  # half-precision parameters: float32 state and update (module docstring)

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        params = [params] if isinstance(params, torch.Tensor) else list(params or ())
        bare = [p[1] if isinstance(p, tuple) else p for p in params]  # torch also accepts (name, param)
        check_unique([{"params": g["params"]} for g in self.param_groups] + [{"params": bare}])
        super().add_param_group(dict(param_group, params=params))
        index = len(self.param_groups) - 1
        try:
            group = self.param_groups[index]
            check_common(group, index)
            check_fd_group(group, index)
            if fd_active(group) and not self.supports_fd:
                raise ValueError(
                    f"param group {index} asks for Frobenius decay (fd={group['fd']}), which "
                    f"{type(self).__name__} does not apply; use FLAMBe (LAMB) or AdamWFD (AdamW)"
                )
            self.check_group(group, index)
        except ValueError:
            self.param_groups.pop()
            raise

    def check_group(self, group: dict, index: int) -> None:
        """Checks of a subclass's own options (raise ValueError)."""

    def _gather(self, group: dict):
        """Tensors with a gradient, their Adam moments and (incremented) per-tensor step counts."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            dtype = state_dtype(p)
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)  # moment m
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)  # v
            for key in ("exp_avg", "exp_avg_sq"):
                if state[key].dtype != dtype:  # torch's load_state_dict casts state to the parameter's dtype
                    state[key] = state[key].to(dtype)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

"""Shared plumbing of the optimizers: argument checks and Frobenius-decay (FD) groups.

An FD group is an ordinary ``torch.optim`` parameter group with two extra entries, both plain data (ints,
floats, strings, dicts, lists) so that ``optimizer.state_dict()`` saves and ``torch.load`` (``weights_only``)
reloads them without any allow-list, and nothing holds a reference to the model:

* ``group["fd"]``: ``{kind: lambda_kind}`` for the kinds ``linear``, ``embedding``, ``qk``, ``ov``;
* ``group["fd_forms"]``: the group's forms, each a :class:`~fnl_transformers.core.FormSpec` whose keys are
  indices into ``group["params"]`` (``FormSpec.with_keys``), stored as ``dataclasses.asdict`` dicts.

The FD math itself lives in :func:`fnl_transformers.core.accumulate_fd_grads`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set

import torch

from ..core import KINDS, FactorView, FormSpec, accumulate_fd_grads, check_fd_coefficients


def check_number(
    name: str,
    value,
    low: float = 0.0,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> float:
    """``value`` as a float in the interval; one clear ValueError otherwise."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}{fix}")
    return x


def check_betas(betas) -> None:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    for i, b in enumerate((b1, b2)):
        check_number(f"betas[{i}]", b, 0.0, 1.0, high_open=True, fix=" (typical: betas=(0.9, 0.999))")


def check_common(group: dict, index: int) -> None:
    """Checks shared by every optimizer here: lr, eps, weight_decay, betas, fd."""
    where = f"param group {index}: "
    check_number(where + "lr", group["lr"])
    check_number(where + "eps", group["eps"])
    check_number(where + "weight_decay", group["weight_decay"], fix=" (0 disables decay)")
    try:
        check_betas(group["betas"])
    except ValueError as e:
        raise ValueError(where + str(e)) from None
    fd = group.setdefault("fd", {})
    if not isinstance(fd, dict) or set(fd) - set(KINDS):
        raise ValueError(f"{where}fd must be a dict with keys among {KINDS}, got {fd!r}")
    try:
        coeffs = check_fd_coefficients(**fd)  # the one validation of FD coefficients
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    fd.update({kind: coeffs[kind] for kind in fd})


def encode_forms(forms, n_params: int, index: int) -> List[dict]:
    """FormSpecs (or their dict encodings) keyed by indices into the group's params -> plain dicts."""
    out = []
    for spec in forms:
        if isinstance(spec, dict):
            spec = decode_form(spec)
        if not isinstance(spec, FormSpec):
            raise ValueError(f"param group {index}: fd_forms entries must be FormSpec, got {type(spec).__name__}")
        if spec.kind not in KINDS:
            raise ValueError(f"param group {index}: form kind must be one of {KINDS}, got {spec.kind!r}")
        for key in spec.keys():
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < n_params:
                raise ValueError(
                    f"param group {index}: form keys must be indices into the group's params (0..{n_params - 1}), "
                    f"got {key!r}; re-key specs with FormSpec.with_keys or build groups with param_groups(model)"
                )
        out.append(dataclasses.asdict(spec))
    return out


def decode_form(d: dict) -> FormSpec:
    return FormSpec(d["kind"], FactorView(**d["a"]), FactorView(**d["b"]), d.get("m"))


def fd_active(group: dict) -> bool:
    return bool(group.get("fd_forms")) and any(group.get("fd", {}).get(k, 0.0) for k in KINDS)


def check_fd_group(group: dict, index: int) -> None:
    """An FD group's forms must index its own params, and it may not also carry regular weight decay."""
    group["fd_forms"] = encode_forms(group.get("fd_forms", ()), len(group["params"]), index)
    if fd_active(group) and group["weight_decay"] != 0:
        raise ValueError(
            f"param group {index} has Frobenius decay (fd={group['fd']}) and weight_decay={group['weight_decay']}: "
            "a parameter may receive one or the other, never both; set the group's weight_decay to 0 "
            "(param_groups(model, ...) builds groups that way)"
        )


def check_unique(param_groups: List[dict]) -> None:
    """A parameter may appear in one group only (torch's own check names neither the groups nor the fix)."""
    seen: Dict[int, int] = {}
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} appears in param groups {seen[id(p)]} and {gi} "
                    f"(or twice in one group); each parameter must be in exactly one group "
                    "(build groups with fnl_transformers.optim.param_groups(model, ...))"
                )
            seen[id(p)] = gi


class GroupForms(NamedTuple):
    """A group's FD forms, ready for :func:`fnl_transformers.core.accumulate_fd_grads`."""

    specs: List[FormSpec]
    lookup: Callable[[Any], torch.Tensor]  # a form key (an index into the group's params) -> the tensor
    coeffs: Dict[str, float]

    def param_ids(self) -> Set[int]:
        """``id`` of every parameter read by a form of nonzero coefficient."""
        return {id(self.lookup(k)) for s in self.specs if self.coeffs.get(s.kind, 0.0) for k in s.keys()}

    def add_to(self, out: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
        """``out[id(p)] += lambda_kind * dFD/dp`` from the current weights (new float32 buffers where missing)."""
        return accumulate_fd_grads(self.specs, self.lookup, self.coeffs, out)


def group_forms(group: dict) -> Optional[GroupForms]:
    if not fd_active(group):
        return None
    return GroupForms([decode_form(d) for d in group["fd_forms"]], group["params"].__getitem__, group["fd"])


def fd_terms(group: dict) -> Dict[int, torch.Tensor]:
    """``{id(p): lambda_kind * dFD/dp}`` (float32) for the group's forms, from the current weights."""
    forms = group_forms(group)
    return {} if forms is None else forms.add_to({})

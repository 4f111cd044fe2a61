"""Parameter groups from a model, by the one decay policy (:class:`fnl_transformers.core.DecayPolicy`): Frobenius
decay on factors of forms with FD, weight decay elsewhere, none on biases and normalization layers."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from torch import nn

from ..core import FD, NO_DECAY, DecayPolicy, FDSpec, default_no_decay, iter_specs, module_lookup
from ._fd import check_number, encode_forms

NoDecay = Union[Callable[[str, nn.Parameter, nn.Module], bool], Iterable[str]]


def _no_decay_rule(no_decay: NoDecay) -> Callable[[str, nn.Parameter, nn.Module], bool]:
    if callable(no_decay):
        return no_decay
    if isinstance(no_decay, str):
        raise ValueError(f"no_decay must be a callable or a list of name substrings, got the string {no_decay!r}")
    patterns = tuple(no_decay)
    return lambda name, param, module: any(s in name for s in patterns)


def _rekey(get: Callable[[Any], Any], index: Dict[int, int]) -> Callable[[Any], int]:
    """A form key (a path in its module) -> the index of the parameter it names in the FD group."""
    return lambda key: index[id(get(key))]


def param_groups(
    model: nn.Module,
    fd_linear: float = 0.0,
    fd_embedding: Optional[float] = None,
    fd_qk: float = 0.0,
    fd_ov: float = 0.0,
    weight_decay: float = 0.0,
    no_decay: NoDecay = default_no_decay,
    params: Optional[Iterable[nn.Parameter]] = None,
    weight_decay_factors: bool = True,
) -> List[dict]:
    """Optimizer parameter groups of ``model`` for :class:`FLAMBe`, :class:`AdamWFD` (or any optimizer).

    * **FD group**: every factor of a form whose kind has a nonzero coefficient (``fd_<kind>``; ``fd_embedding``
      None means the same as ``fd_linear``), with ``weight_decay=0``, ``fd={kind: lambda}`` and ``fd_forms``
      (the forms re-keyed to indices into the group's ``params``, stored as plain dicts so ``state_dict``
      round-trips).
    * **decay group**: every other trainable parameter, with ``weight_decay`` (factors of forms whose
      coefficient is 0 included unless ``weight_decay_factors=False``: ``param_groups(model, fd_ov=1e-2,
      weight_decay=0.01)`` is FD on the OV forms and regular decay everywhere else, the paper's FLAMBe setting).
    * **no-decay group**: parameters for which ``no_decay(name, param, module)`` is true (default
      :func:`~fnl_transformers.core.default_no_decay`: biases and normalization layers), and factors without FD
      when ``weight_decay_factors=False``; ``weight_decay=0``. ``no_decay`` may also be a list of substrings of
      parameter names (HF style: ``["bias", "LayerNorm.weight"]``).

    The decision per parameter is :class:`~fnl_transformers.core.DecayPolicy`'s. Frozen parameters
    (``requires_grad=False``) are left out, except a frozen factor of an FD form with a trainable factor (its value
    enters the FD gradient; it has no gradient, so it is never updated). ``params`` restricts the groups to those
    parameters (each must belong to ``model``), e.g. the list a training framework hands its optimizer. Empty
    groups are omitted. No parameter is in two groups.
    """
    fd = FDSpec(fd_linear, fd_embedding, fd_qk, fd_ov)
    weight_decay = check_number("weight_decay", weight_decay, fix=" (0 disables decay)")
    policy = DecayPolicy(fd, weight_decay_factors=weight_decay_factors, bias_norm=_no_decay_rule(no_decay))
    assigned = policy.assign(model)  # model order, each parameter once
    owner: Dict[int, tuple] = {id(p): (name, p, decay) for name, p, decay in assigned}
    if params is None:
        wanted = {i for i, (_, p, _) in owner.items() if p.requires_grad}
    else:
        wanted = set()
        for p in params:
            if id(p) not in owner:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} passed in `params` is not a parameter of "
                    "`model`; pass the model that owns it"
                )
            wanted.add(id(p))

    # FD forms: those of active kinds with at least one wanted factor (all their factors join the FD group)
    fd_ids: List[int] = []
    forms = []  # (spec, lookup)
    for _, module, spec in iter_specs(model, fd.active):
        get = module_lookup(module)
        ids = [id(get(key)) for key in spec.keys()]
        if not any(i in wanted for i in ids):
            continue
        forms.append((spec, get))
        fd_ids.extend(i for i in ids if i not in fd_ids)
    order = {i: n for n, i in enumerate(owner)}  # model order
    fd_ids.sort(key=order.__getitem__)
    index = {i: n for n, i in enumerate(fd_ids)}
    fd_forms = [spec.with_keys(_rekey(get, index)) for spec, get in forms]

    decay: List[nn.Parameter] = []
    no: List[nn.Parameter] = []
    for i, (_, p, decision) in owner.items():
        if i in wanted and i not in index:
            assert decision != FD, "a factor of an FD form outside the FD group"
            (no if decision == NO_DECAY else decay).append(p)

    groups = []
    if fd_ids:
        fd_params = [owner[i][1] for i in fd_ids]
        coeffs = fd.coefficients()
        groups.append(
            {
                "params": fd_params,
                "weight_decay": 0.0,
                "fd": {k: coeffs[k] for k in fd.active},
                "fd_forms": encode_forms(fd_forms, len(fd_params), 0),
            }
        )
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no:
        groups.append({"params": no, "weight_decay": 0.0})
    return groups

"""The decay policy: which parameters get Frobenius decay, weight decay, or neither. Written once, used by
``optim.param_groups``, the HuggingFace ``FNLTrainer`` (both FD modes) and the fairseq plugin's optimizers.

Each trainable parameter gets exactly one of ``FD``, ``WEIGHT_DECAY`` or ``NO_DECAY``:

1. a factor of a form whose kind has a nonzero FD coefficient -> ``FD`` (never weight decay as well);
2. a bias or normalization-layer parameter -> ``NO_DECAY`` unless ``decay_bias_norm`` (HuggingFace ``Trainer``
   convention: False; fairseq's stock optimizers decay everything, so the fairseq side passes True unless
   ``--no-decay-bias-norm``);
3. a factor of a form whose kind has no FD -> ``WEIGHT_DECAY`` if ``weight_decay_factors`` (the paper's weight
   decay baselines decay the factors: FD is what it compares against weight decay on ``U`` and ``V``), else
   ``NO_DECAY``;
4. everything else -> ``WEIGHT_DECAY``.

"Factors" are the parameters that forms read (:func:`~fnl_transformers.core.form_parameters`): ``U``, ``V``,
``M`` of factorized layers and the q/k/v/o projection weights of attention modules with registered forms.

For frameworks that hand an optimizer a bare parameter list (fairseq), :func:`form_memberships` describes, per
parameter, the forms it belongs to (plain data, e.g. stored in ``p.optim_overrides``), and
:func:`forms_from_memberships` rebuilds the forms as :class:`~fnl_transformers.core.FormSpec` s keyed by
indices into whatever list of parameters (or fp32 copies of them) the optimizer receives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from .forms import FactorView, FormSpec, form_parameters, iter_specs, module_lookup
from .settings import FDSpec

FD, WEIGHT_DECAY, NO_DECAY = "fd", "weight_decay", "none"
DECAYS = (FD, WEIGHT_DECAY, NO_DECAY)

BiasNormRule = Callable[[str, nn.Parameter, nn.Module], bool]


def default_no_decay(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """Biases (``*bias``) and every parameter of a normalization layer (a module whose class name contains
    ``Norm``: ``nn.LayerNorm``, ``nn.RMSNorm``, HF's ``T5LayerNorm``, fairseq's LayerNorm...)."""
    return name.rsplit(".", 1)[-1].endswith("bias") or "norm" in type(module).__name__.lower()


@dataclass(frozen=True)
class DecayPolicy:
    """FD / weight decay / none for each parameter (see the module docstring for the rule)."""

    fd: FDSpec = field(default_factory=FDSpec)
    weight_decay_factors: bool = field(
        default=True,
        metadata={
            "help": (
                "weight decay on the factors of forms without FD (U, V of factorized layers, attention projections); "
                "False gives them no decay"
            )
        },
    )
    decay_bias_norm: bool = field(
        default=False, metadata={"help": ("weight decay on biases and normalization layers too")}
    )
    bias_norm: BiasNormRule = default_no_decay

    def __post_init__(self):
        for name in ("weight_decay_factors", "decay_bias_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def decide(self, kinds: Iterable[str], bias_norm: bool) -> str:
        """The decay of a parameter that is a factor of forms of ``kinds`` (empty: not a factor)."""
        kinds = set(kinds)
        if kinds & set(self.fd.active):
            return FD
        if bias_norm and not self.decay_bias_norm:
            return NO_DECAY
        if kinds and not self.weight_decay_factors:
            return NO_DECAY
        return WEIGHT_DECAY

    def assign(self, model: nn.Module) -> List[Tuple[str, nn.Parameter, str]]:
        """``(qualified name, parameter, decay)`` for every parameter of ``model`` once (first name of a tied
        parameter), in model order; frozen parameters included (callers choose what to optimize)."""
        kinds: Dict[int, set] = {}
        for _, p, kind in form_parameters(model):
            kinds.setdefault(id(p), set()).add(kind)
        out, seen = [], set()
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                name = f"{mname}.{pname}" if mname else pname
                out.append((name, p, self.decide(kinds.get(id(p), ()), self.bias_norm(name, p, module))))
        return out


# ------------------------------------------------------------------------- forms of a bare parameter list
def form_memberships(model: nn.Module, kinds: Sequence[str]) -> Dict[int, List[dict]]:
    """``{id(p): [membership, ...]}`` for every factor of the forms of ``kinds``; a membership is plain data
    ``{"form": id, "kind": kind, "role": "a"|"b"|"m", "view": {heads, transpose, start, stop}}``."""
    out: Dict[int, List[dict]] = {}
    for index, (name, module, spec) in enumerate(iter_specs(model, tuple(kinds))):
        get = module_lookup(module)
        form_id = f"{name}#{index}"
        roles: List[Tuple[str, Hashable, Optional[FactorView]]] = [("a", spec.a.key, spec.a), ("b", spec.b.key, spec.b)]
        if spec.m is not None:
            roles.append(("m", spec.m, None))
        for role, key, view in roles:
            entry: Dict[str, Any] = {"form": form_id, "kind": spec.kind, "role": role}
            if view is not None:
                entry["view"] = {k: v for k, v in dataclasses.asdict(view).items() if k != "key"}
            out.setdefault(id(get(key)), []).append(entry)
    return out


def forms_from_memberships(memberships: Sequence[Optional[Sequence[dict]]]) -> List[FormSpec]:
    """FormSpecs keyed by indices into a parameter list whose ``i``-th entry has ``memberships[i]`` (``None`` or
    empty for parameters outside forms). A form missing a factor is an error naming it."""
    parts: Dict[str, dict] = {}
    for index, entries in enumerate(memberships):
        for e in entries or ():
            form = parts.setdefault(e["form"], {"kind": e["kind"]})
            form[e["role"]] = (index, e.get("view"))
    specs = []
    for form_id, form in parts.items():
        missing = [r for r in ("a", "b") if r not in form]
        if missing:
            raise ValueError(
                f"form {form_id} ({form['kind']}) lacks its factor(s) {missing} in the optimizer's parameters; "
                "decoupled FD needs every factor of a decayed form (none frozen, none in a flat fp16 buffer)"
            )
        a, b = (FactorView(form[role][0], **form[role][1]) for role in ("a", "b"))
        specs.append(FormSpec(form["kind"], a=a, b=b, m=form["m"][0] if "m" in form else None))
    return specs


__all__ = [
    "DECAYS",
    "FD",
    "NO_DECAY",
    "WEIGHT_DECAY",
    "DecayPolicy",
    "default_no_decay",
    "form_memberships",
    "forms_from_memberships",
]

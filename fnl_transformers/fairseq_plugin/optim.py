"""fairseq optimizers that give each parameter the decay the model chose: ``fnl_adam``, ``flambe``, ``fnl_lamb``.

fairseq hands an optimizer one flat parameter list, and its stock optimizers (``adam``, ``sgd``, ...) decay all of
it. An ``fnl_transformer`` model records, at build time, each parameter's decay under the one decay policy
(:class:`fnl_transformers.core.DecayPolicy`: FD, weight decay or none) in ``p.optim_overrides["fnl"]``, with its
form memberships for decoupled FD; these optimizers rebuild the groups from whatever list they receive, with no
reference to the model: the model's parameters, fairseq's per-parameter float32 master copies (which carry
``optim_overrides``; ``--fp16`` and ``--bf16`` make them per parameter for these optimizers) or the half-precision
parameters themselves (``--memory-efficient-fp16/-bf16``) (:mod:`fnl_transformers.fairseq_plugin.precision`):

* ``--optimizer fnl_adam``: fairseq's ``adam`` (same options, same update; ``FusedAdam`` on GPU) with parameter
  groups: ``--weight-decay`` for the parameters the policy decays, 0 for the others (FD factors, biases and norms
  with ``--no-decay-bias-norm``, factors with ``--no-weight-decay-factors``).
* ``--optimizer flambe``: :class:`fnl_transformers.optim.FLAMBe` (LAMB with *decoupled* FD, paper Sec. 6 and
  Table 4): with ``--fd-mode decoupled`` the FD coefficients (``--fd-qk``/``--fd-ov``/``--fd-linear``/
  ``--fd-embedding``) are applied in the optimizer, not the loss; the same groups otherwise.
  ``--optimizer fnl_lamb``: :class:`fnl_transformers.optim.Lamb` (fairseq's ``lamb`` is apex's ``FusedLAMB``),
  the same groups, no decoupled FD.
* ``--no-decay-bias-norm`` (all three): no weight decay on biases and normalization layers (BERT practice;
  fairseq's default decays them). The model reads it when it is built.

Inconsistent combinations (a stock optimizer with ``--weight-decay`` and FD, decoupled FD without ``flambe``) are
refused when the model is built (:mod:`fnl_transformers.fairseq_plugin.model`). Parameters
without the record (another model's, or the criterion's) get ``--weight-decay``, exactly as fairseq's own
optimizers do.
"""
# (no `from __future__ import annotations`: fairseq reads the config dataclasses' field types at runtime)

import ast
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List, Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from omegaconf import II, OmegaConf

from ..core import FD, NO_DECAY, forms_from_memberships
from ..optim import FLAMBe, Lamb
from .model import OVERRIDES_KEY


def fnl_param_groups(params, weight_decay: float, no_decay_bias_norm: bool = False) -> List[dict]:
    """Parameter groups for the flat list fairseq passes an optimizer, from each parameter's
    ``optim_overrides["fnl"]`` (see the module docstring): a decoupled-FD group (``fd``, ``fd_forms``), a
    ``weight_decay`` group and a group without decay; empty groups are omitted."""
    params = list(params)
    records = [(getattr(p, "optim_overrides", None) or {}).get(OVERRIDES_KEY) for p in params]
    if all(r is None for r in records):
        if no_decay_bias_norm:
            raise ValueError(
                "--no-decay-bias-norm needs parameters of a model built with --arch fnl_transformer*, which record "
                "each parameter's decay; a stock model's parameters all get --weight-decay"
            )
        return [{"params": params, "weight_decay": weight_decay}]
    fd_params, memberships, coeffs, decay, none = [], [], {}, [], []
    for p, r in zip(params, records):
        if r is not None and r["decay"] == FD and "forms" in r:  # decoupled FD
            fd_params.append(p)
            memberships.append(r["forms"])
            coeffs = r["fd"]
        elif r is not None and r["decay"] in (FD, NO_DECAY):
            none.append(p)
        else:
            decay.append(p)
    groups = []
    if fd_params:
        groups.append(
            {
                "params": fd_params,
                "weight_decay": 0.0,
                "fd": dict(coeffs),
                "fd_forms": forms_from_memberships(memberships),
            }
        )
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if none:
        groups.append({"params": none, "weight_decay": 0.0})
    return groups


def _lr(cfg) -> float:
    return cfg.lr[0] if isinstance(cfg.lr, Collection) else cfg.lr


def _betas(betas) -> tuple:
    if isinstance(betas, str):  # "(0.9, 0.98)" on the command line
        return tuple(ast.literal_eval(betas))
    return tuple(betas) if isinstance(betas, (tuple, list)) else tuple(OmegaConf.to_container(betas))


@dataclass
class FnlAdamConfig(FairseqAdamConfig):
    no_decay_bias_norm: bool = field(
        default=False,
        metadata={
            "help": "no weight decay on biases and normalization layers (the fnl_transformer "
            "model reads it when it is built)"
        },
    )


class FnlAdam(FairseqAdam):
    """fairseq's ``adam`` with the decay policy's groups (FD factors kept out of ``--weight-decay``)."""

    def __init__(self, cfg: FnlAdamConfig, params):
        groups = fnl_param_groups(params, cfg.weight_decay, no_decay_bias_norm=cfg.no_decay_bias_norm)
        super().__init__(cfg, groups)


@dataclass
class FnlLambConfig(FairseqDataclass):
    lamb_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for LAMB"})
    lamb_eps: float = field(default=1e-6, metadata={"help": "epsilon for LAMB"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (inside the trust ratio)"})
    trust_clip: Optional[float] = field(default=None, metadata={"help": "upper bound on the trust ratio"})
    no_decay_bias_norm: bool = field(
        default=False,
        metadata={
            "help": "no weight decay on biases and normalization layers (the fnl_transformer "
            "model reads it when it is built)"
        },
    )
    lr: List[float] = II("optimization.lr")


@dataclass
class FLAMBeConfig(FnlLambConfig):
    """FLAMBe takes FnlLamb's options; its FD coefficients are the model's (``--fd-* X --fd-mode decoupled``)."""


class FnlLamb(FairseqOptimizer):
    """:class:`fnl_transformers.optim.Lamb` for fairseq (``--optimizer fnl_lamb``)."""

    torch_optimizer = Lamb

    def __init__(self, cfg, params):
        super().__init__(cfg)
        groups = fnl_param_groups(params, cfg.weight_decay, no_decay_bias_norm=cfg.no_decay_bias_norm)
        self._optimizer = self.torch_optimizer(groups, **self.optimizer_config)

    @property
    def optimizer_config(self):
        return {
            "lr": _lr(self.cfg),
            "betas": _betas(self.cfg.lamb_betas),
            "eps": self.cfg.lamb_eps,
            "weight_decay": self.cfg.weight_decay,
            "trust_clip": self.cfg.trust_clip,
        }


class FairseqFLAMBe(FnlLamb):
    """:class:`fnl_transformers.optim.FLAMBe` for fairseq (``--optimizer flambe``): LAMB with decoupled FD."""

    torch_optimizer = FLAMBe


OPTIMIZERS = {
    "fnl_adam": (FnlAdam, FnlAdamConfig),
    "fnl_lamb": (FnlLamb, FnlLambConfig),
    "flambe": (FairseqFLAMBe, FLAMBeConfig),
}

"""fairseq optimizers that keep Frobenius-decayed factors out of ``--weight-decay``: ``fnl_adam``, ``flambe``,
``fnl_lamb``.

FD replaces weight decay on the factors it decays (paper, Khodak et al., ICLR 2021, Sec. 3.2: keep the
coefficient, swap WD for FD). fairseq hands an optimizer one flat parameter list, and its stock optimizers
(``adam``, ``sgd``, ...) decay all of it, so:

* ``--optimizer fnl_adam``: fairseq's ``adam`` (same options, same update; ``FusedAdam`` on GPU) with parameter
  groups: the factors decayed by the criterion's FD (``--fd-qk``/``--fd-ov``/``--fd-linear``/``--fd-embedding``)
  get weight decay 0, every other parameter ``--weight-decay``.
* ``--optimizer flambe``: :class:`fnl_transformers.optim.FLAMBe` (LAMB with *decoupled* FD, paper Sec. 5), FD
  coefficients ``--decoupled-fd-qk``/``-ov``/``-linear``/``-embedding`` (applied in the optimizer, not the loss);
  the same groups otherwise. ``--optimizer fnl_lamb``: :class:`fnl_transformers.optim.Lamb` (fairseq's ``lamb``
  is apex's ``FusedLAMB``), the same groups, no decoupled FD.
* ``--no-decay-bias-norm`` (all three): also no weight decay on biases and normalization layers (BERT practice;
  fairseq's default decays them).

With ``fnl_transformer`` models and a stock optimizer, ``--weight-decay > 0`` together with the criterion's FD is
refused at model build time with the fix (see :func:`fnl_transformers.fairseq_plugin.model._check_optimizer`).
The groups are built by :func:`fnl_transformers.optim.param_groups`; the optimizer finds the model of its
parameters among the ``fnl_transformer`` models built in the process. Parameters of other models (e.g. stock
``transformer``) form one group with ``--weight-decay``, exactly as fairseq's own optimizers do.
"""
# (no `from __future__ import annotations`: fairseq reads the config dataclasses' field types at runtime)

import ast
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from omegaconf import II, OmegaConf

from ..core import KINDS
from ..optim import FLAMBe, Lamb, default_no_decay, param_groups
from .model import LIVE_MODELS


def find_model(params: List) -> Optional[Any]:
    """The live ``fnl_transformer`` model owning (most of) ``params``, or None."""
    ids = {id(p) for p in params}
    best, best_n = None, 0
    for model in list(LIVE_MODELS):
        n = sum(1 for p in model.parameters() if id(p) in ids)
        if n > best_n:
            best, best_n = model, n
    return best


def fnl_param_groups(params, weight_decay: float, decoupled: Optional[Dict[str, float]] = None,
                     no_decay_bias_norm: bool = False) -> List[dict]:
    """Parameter groups for the flat list fairseq passes an optimizer (see the module docstring)."""
    params = list(params)
    decoupled = {k: float(v) for k, v in (decoupled or {}).items() if v}
    model = find_model(params)
    if model is None:
        if decoupled or no_decay_bias_norm:
            raise ValueError(
                "--decoupled-fd-* and --no-decay-bias-norm need parameters of a model built with "
                "--arch fnl_transformer* (and not copied into a flat fp16 buffer: use --memory-efficient-fp16)"
            )
        return [{"params": params, "weight_decay": weight_decay}]
    twice = [k for k in decoupled if model.fnl_criterion_fd.get(k, 0) > 0]
    if twice:
        raise ValueError(
            f"FD on {', '.join(twice)} is both in the loss (--fd-{twice[0]}) and decoupled in the optimizer "
            f"(--decoupled-fd-{twice[0]}): it would count twice; keep one of them"
        )
    excluded = {id(p) for _, p, _ in model.fd_parameters()}

    def no_decay(name, p, module):
        return id(p) in excluded or (no_decay_bias_norm and default_no_decay(name, p, module))

    own = {id(p) for p in model.parameters()}
    mine = [p for p in params if id(p) in own]
    others = [p for p in params if id(p) not in own]  # e.g. criterion parameters: fairseq's behaviour
    groups = param_groups(model, weight_decay=weight_decay, no_decay=no_decay, params=mine,
                          **{f"fd_{k}": v for k, v in decoupled.items()})
    if others:
        groups.append({"params": others, "weight_decay": weight_decay})
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
        default=False, metadata={"help": "no weight decay on biases and normalization layers either"})


class FnlAdam(FairseqAdam):
    """fairseq's ``adam`` with the factors decayed by the criterion's FD kept out of ``--weight-decay``."""

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
        default=False, metadata={"help": "no weight decay on biases and normalization layers either"})
    lr: List[float] = II("optimization.lr")


@dataclass
class FLAMBeConfig(FnlLambConfig):
    decoupled_fd_qk: float = field(default=0.0, metadata={"help": "decoupled FD coefficient of the QK forms"})
    decoupled_fd_ov: float = field(default=0.0, metadata={"help": "decoupled FD coefficient of the OV forms"})
    decoupled_fd_linear: float = field(
        default=0.0, metadata={"help": "decoupled FD coefficient of factorized FFN layers (and embeddings unless "
                                       "--decoupled-fd-embedding is given)"})
    decoupled_fd_embedding: Optional[float] = field(
        default=None, metadata={"help": "decoupled FD coefficient of factorized embeddings (default: linear's)"})


class FnlLamb(FairseqOptimizer):
    """:class:`fnl_transformers.optim.Lamb` for fairseq (``--optimizer fnl_lamb``)."""

    torch_optimizer = Lamb

    def __init__(self, cfg, params):
        super().__init__(cfg)
        groups = fnl_param_groups(params, cfg.weight_decay, decoupled=self._decoupled(),
                                  no_decay_bias_norm=cfg.no_decay_bias_norm)
        self._optimizer = self.torch_optimizer(groups, **self.optimizer_config)

    def _decoupled(self) -> Dict[str, float]:
        return {}

    @property
    def optimizer_config(self):
        return {"lr": _lr(self.cfg), "betas": _betas(self.cfg.lamb_betas), "eps": self.cfg.lamb_eps,
                "weight_decay": self.cfg.weight_decay, "trust_clip": self.cfg.trust_clip}


class FairseqFLAMBe(FnlLamb):
    """:class:`fnl_transformers.optim.FLAMBe` for fairseq (``--optimizer flambe``): LAMB with decoupled FD."""

    torch_optimizer = FLAMBe

    def _decoupled(self) -> Dict[str, float]:
        c = self.cfg
        emb = c.decoupled_fd_linear if c.decoupled_fd_embedding is None else c.decoupled_fd_embedding
        out = {"linear": c.decoupled_fd_linear, "embedding": emb, "qk": c.decoupled_fd_qk, "ov": c.decoupled_fd_ov}
        assert set(out) == set(KINDS)
        return out


OPTIMIZERS = {
    "fnl_adam": (FnlAdam, FnlAdamConfig),
    "fnl_lamb": (FnlLamb, FnlLambConfig),
    "flambe": (FairseqFLAMBe, FLAMBeConfig),
}

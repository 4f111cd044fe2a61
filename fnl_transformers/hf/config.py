"""``FNLConfig``: what :func:`fnl_transformers.hf.patch_model` factorizes, how, and how it is regularized.

Paper: Khodak, Tenenholtz, Mackey, Fusi, "Initialization and Regularization of Factorized Neural Layers",
ICLR 2021: Sec. 2 (rank scale), Sec. 3.1 (spectral initialization, SI), Sec. 3.2 (Frobenius decay, FD),
Sec. 4 (attention heads as factorized QK and OV forms; shrinking the head dimension), Sec. 5 (overcomplete
"deep" factors ``U M V^T`` multiplied out after training), Sec. 6 (FLAMBe: LAMB with decoupled FD).

Plain data (a dataclass), validated in ``__post_init__``; ``to_dict``/``from_dict`` round-trip through JSON,
which is how a patched model's ``config.json`` stores it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Optional, Tuple

from ..core.rank import check_positive_int, check_rank_scale

PARTS = ("ffn", "embedding", "attention")
FD_MODES = ("coupled", "decoupled")


@dataclass
class FNLConfig:
    """How to factorize and regularize a HuggingFace transformer.

    Which layers become low-rank factors (``FactorizedLinear`` / ``FactorizedEmbedding``, ``W = U [M] V^T``):

    * ``factorize``: parts among ``"ffn"`` (the feed-forward layers of every block), ``"embedding"`` (the input
      word embedding; an untied output embedding / LM head is factorized with it, a tied one follows it) and
      ``"attention"`` (shrink every head's dimension by ``rank_scale``, when no ``head_dim`` is given).
    * ``rank_scale``: each chosen ``m x n`` layer gets rank ``max(1, round(rank_scale * min(m, n)))`` (paper
      Sec. 2). ``None`` (default) factorizes nothing unless ``ranks`` or ``target_param_ratio`` is given.
    * ``ranks``: per-module ranks, ``{glob pattern over the module's qualified name: rank}`` (``fnmatch``,
      e.g. ``{"*.intermediate.dense": 64}``); the first matching pattern wins over ``rank_scale``. A pattern that
      matches no layer of the chosen parts is an error (typos never pass silently).
    * ``target_param_ratio``: instead of ``rank_scale``, the rank scale whose factorized model keeps this
      fraction of the original model's parameters (after any head shrinking), found by
      :func:`fnl_transformers.core.rank_scale_for_param_ratio`.

    Attention (paper Sec. 4; every head's ``W_q,h W_k,h^T`` and ``W_o,h W_v,h`` is already a factorized form):

    * ``head_dim``: reduced per-head dimension for both forms (``None`` keeps it); ``qk_head_dim`` /
      ``ov_head_dim`` set them separately (give either ``head_dim`` or these). Each head's form becomes its best
      rank-``head_dim`` approximation (per-head SI), with the attention's original score scaling. Heads only
      shrink. These shrink attention whatever ``factorize`` says.

    Initialization and regularization:

    * ``spectral_init``: factors from the truncated SVD of the pretrained weights (SI, paper Sec. 3.1); ``False``
      draws fresh random factors / projections (the paper's baseline).
    * ``deep``: overcomplete/deep factors ``U M V^T`` (``M`` starts at the identity), multiplied out by
      :func:`fnl_transformers.hf.recompose` after training (teacher-free distillation, paper Sec. 5).
    * ``fd_linear``, ``fd_embedding``, ``fd_qk``, ``fd_ov``: Frobenius-decay coefficients ``lambda`` per kind of
      form (``lambda/2 ||W||_F^2`` of each product, paper Eq. (3)); 0 disables a kind.
    * ``fd_mode``: ``"coupled"`` (penalty added to the loss) or ``"decoupled"`` (applied by the optimizer, e.g.
      ``FLAMBe`` / ``AdamWFD``).

    ``FNLConfig()`` changes no layer: it only registers the QK/OV forms so FD can regularize attention.
    """

    rank_scale: Optional[float] = None
    factorize: Tuple[str, ...] = ("ffn", "embedding")
    ranks: Dict[str, int] = field(default_factory=dict)
    target_param_ratio: Optional[float] = None
    head_dim: Optional[int] = None
    qk_head_dim: Optional[int] = None
    ov_head_dim: Optional[int] = None
    spectral_init: bool = True
    deep: bool = False
    fd_linear: float = 0.0
    fd_embedding: float = 0.0
    fd_qk: float = 0.0
    fd_ov: float = 0.0
    fd_mode: str = "coupled"

    def __post_init__(self):
        if self.rank_scale is not None:
            self.rank_scale = check_rank_scale(self.rank_scale)
        parts = (self.factorize,) if isinstance(self.factorize, str) else self.factorize
        try:
            parts = tuple(parts)
        except TypeError:
            raise ValueError(f"factorize must be a list of parts among {PARTS}, got {self.factorize!r}") from None
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"factorize: unknown part(s) {unknown}; choose among {list(PARTS)}")
        self.factorize = tuple(dict.fromkeys(parts))
        if not isinstance(self.ranks, dict):
            raise ValueError(f"ranks must be a dict {{module name pattern: rank}}, got {self.ranks!r}")
        for pattern, rank in self.ranks.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"ranks: keys must be module-name patterns (non-empty strings), got {pattern!r}")
            check_positive_int(f"ranks[{pattern!r}]", rank)
        if self.target_param_ratio is not None:
            r = self.target_param_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 1:
                raise ValueError(f"target_param_ratio must be a number in (0, 1], got {r!r}")
            if self.rank_scale is not None:
                raise ValueError("give rank_scale or target_param_ratio, not both")
            if "attention" in self.factorize and self.head_dim is None and self.qk_head_dim is None \
                    and self.ov_head_dim is None:
                raise ValueError(
                    "target_param_ratio sets the rank scale of FFN/embedding layers only: with 'attention' in "
                    "factorize give head_dim (or qk_head_dim/ov_head_dim) explicitly, or drop 'attention'"
                )
        for name in ("head_dim", "qk_head_dim", "ov_head_dim"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(name, value, " (the reduced per-head dimension; None keeps the model's)")
        if self.head_dim is not None and (self.qk_head_dim is not None or self.ov_head_dim is not None):
            raise ValueError("give head_dim (both forms) or qk_head_dim/ov_head_dim (separately), not both")
        for name in ("spectral_init", "deep"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for kind in ("linear", "embedding", "qk", "ov"):
            name = f"fd_{kind}"
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name} (Frobenius decay coefficient) must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.fd_mode not in FD_MODES:
            raise ValueError(f"fd_mode must be one of {list(FD_MODES)}, got {self.fd_mode!r}")

    # --- derived settings ------------------------------------------------------------------------------------
    def head_dims(self, original: int) -> Tuple[int, int]:
        """``(qk, ov)`` per-head dimensions for heads of ``original`` dims (unchanged when not reduced)."""
        qk = self.qk_head_dim if self.head_dim is None else self.head_dim
        ov = self.ov_head_dim if self.head_dim is None else self.head_dim
        if "attention" in self.factorize and self.rank_scale is not None:
            scaled = max(1, int(round(self.rank_scale * original)))
            qk = scaled if qk is None else qk
            ov = scaled if ov is None else ov
        return (original if qk is None else qk), (original if ov is None else ov)

    @property
    def fd_coefficients(self) -> Dict[str, float]:
        """``{kind: lambda}`` for :func:`fnl_transformers.core.frobenius_penalty` and the optimizers."""
        return {"linear": self.fd_linear, "embedding": self.fd_embedding, "qk": self.fd_qk, "ov": self.fd_ov}

    # --- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = asdict(self)
        out["factorize"] = list(self.factorize)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FNLConfig":
        if not isinstance(data, dict):
            raise ValueError(f"FNLConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"FNLConfig: unknown field(s) {unknown} (saved by another fnl_transformers version?); "
                f"known fields: {sorted(known)}"
            )
        return cls(**data)

"""``FNLConfig``: what :func:`fnl_transformers.hf.patch_model` factorizes, how, and how it is regularized.

A thin converter to the core settings model: one flat field per setting (the names the fairseq plugin spells
as flags, ``fd_linear`` <-> ``--fd-linear``), validated and defaulted by the core specs
(:class:`~fnl_transformers.core.StructureSpec`, :class:`~fnl_transformers.core.FDSpec`, and the decay policy's
``weight_decay_factors``), which ``.structure`` and ``.fd`` return. Each field's meaning is written once, in the
core (listed below). ``to_dict``/``from_dict`` round-trip through JSON, which is how a patched model's
``config.json`` stores it; dicts saved with the former names ``qk_head_dim``/``ov_head_dim`` still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Tuple

from ..core import FDSpec, StructureSpec, flat_settings
from ..core.settings import DEFAULT_DAMPING, specs_from_flat

RENAMED = {"qk_head_dim": "head_dim_qk", "ov_head_dim": "head_dim_ov"}  # former field names -> current


@dataclass
class FNLConfig:
    """How to factorize and regularize a HuggingFace transformer (fields below; ``FNLConfig()`` changes no
    layer: it only registers the QK/OV forms so FD can regularize attention).

    Fields (meanings from the core settings model)::
    """

    rank_scale: Optional[float] = None
    factorize: Tuple[str, ...] = ("ffn", "embedding")
    ranks: Dict[str, int] = field(default_factory=dict)
    target_param_ratio: Optional[float] = None
    head_dim: Optional[int] = None
    head_dim_qk: Optional[int] = None
    head_dim_ov: Optional[int] = None
    spectral_init: bool = True
    spectral_init_qk: Optional[bool] = None
    spectral_init_ov: Optional[bool] = None
    factor_init: str = "random"
    reduced_heads: str = "truncate"
    deep: bool = False
    activation_aware: bool = False
    damping: float = DEFAULT_DAMPING
    fd_linear: float = 0.0
    fd_embedding: Optional[float] = None
    fd_qk: float = 0.0
    fd_ov: float = 0.0
    fd_mode: str = "coupled"
    weight_decay_factors: bool = True

    def __post_init__(self):
        structure, fd, _ = specs_from_flat(self._flat())  # the core's validation (one clear error)
        for name in ("rank_scale", "factorize", "ranks", "target_param_ratio", "damping"):
            setattr(self, name, getattr(structure, name))  # normalized: floats, a tuple of parts
        for kind in ("linear", "embedding", "qk", "ov"):
            setattr(self, f"fd_{kind}", getattr(fd, kind))

    def _flat(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def structure(self) -> StructureSpec:
        """The core :class:`~fnl_transformers.core.StructureSpec` of these settings."""
        return specs_from_flat(self._flat())[0]

    @property
    def fd(self) -> FDSpec:
        """The core :class:`~fnl_transformers.core.FDSpec` of these settings."""
        return specs_from_flat(self._flat())[1]

    # --- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = self._flat()
        out["factorize"] = list(self.factorize)
        out["ranks"] = dict(self.ranks)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FNLConfig":
        if not isinstance(data, dict):
            raise ValueError(f"FNLConfig.from_dict expects a dict, got {type(data).__name__}")
        data = {RENAMED.get(k, k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"FNLConfig: unknown field(s) {unknown} (saved by another fnl_transformers version?); "
                f"known fields: {sorted(known)}"
            )
        return cls(**data)


FNLConfig.__doc__ = (
    (FNLConfig.__doc__ or "")
    + "".join(f"\n        {s.name} (default {s.default!r}): {s.help}" for s in flat_settings())
    + "\n"
)

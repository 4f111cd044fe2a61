"""The settings model: what is factorized and how it starts (:class:`StructureSpec`), and how it is regularized
(:class:`FDSpec`). Each field's meaning is written once, in its ``metadata["help"]``; each spec has one validator
(``__post_init__``) and one defaulting rule per field.

Paper: Khodak, Tenenholtz, Mackey, Fusi, "Initialization and Regularization of Factorized Neural Layers",
ICLR 2021: rank scale (Sec. 2), spectral initialization (SI, Definition 3.1), Frobenius decay (FD, Definition
3.2), attention QK / OV forms (Sec. 2.3, Eq. (1)), overcomplete "deep" factors (Sec. 5).

The integrations are thin converters to these specs, with the same names on both sides:

* HuggingFace: :class:`fnl_transformers.hf.FNLConfig` has one flat field per setting (:func:`flat_settings`),
  and ``.structure`` / ``.fd`` give the specs;
* fairseq: one model flag per setting, ``--`` + the flat name with dashes (``fd_linear`` -> ``--fd-linear``).

Bad values raise :class:`SettingsError`, a ``ValueError`` whose message names the setting; a converter re-spells
it in its own terms (``SettingsError.spelled(namer)``, e.g. ``--rank-scale`` instead of ``rank_scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

KINDS = ("linear", "embedding", "qk", "ov")  # kinds of factorized forms (core.forms reads them from here)
PARTS = ("ffn", "embedding", "position", "attention")
FD_MODES = ("coupled", "decoupled")
HEAD_FORMS = ("qk", "ov")
FACTOR_INITS = ("random", "dense")
HEAD_RULES = ("truncate", "fresh")
DEFAULT_DAMPING = 0.01  # activation-aware truncation: C + damping * mean(diag C) * I (GPTQ's choice)

Namer = Callable[[str], str]


def _plain(name: str) -> str:
    return name


def flag(name: str) -> str:
    """The command-line spelling of a flat setting name: ``fd_linear`` -> ``--fd-linear``."""
    return "--" + name.replace("_", "-")


class SettingsError(ValueError):
    """One bad setting. ``str(error)`` names settings by their flat names (``rank_scale``, ``fd_qk``);
    :meth:`spelled` names them as a converter spells them (``--rank-scale``, ``--fd-qk``)."""

    def __init__(self, message: Callable[[Namer], str]):
        self._message = message
        super().__init__(message(_plain))

    def spelled(self, namer: Namer) -> "SettingsError":
        return SettingsError(lambda _: self._message(namer))


# ---------------------------------------------------------------------------------------------------- checks
def _positive_int(name: str, value, allow_none: bool = True, hint: str = "") -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SettingsError(lambda n: f"{n(name)} must be a positive integer (>= 1), got {value!r}{hint}")
    return value


def _boolean(name: str, value, allow_none: bool = False) -> Optional[bool]:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        choices = "True, False or None" if allow_none else "True or False"
        raise SettingsError(lambda n: f"{n(name)} must be {choices}, got {value!r}")
    return value


def _number(name: str, value, what: str) -> float:
    if isinstance(value, bool):
        raise SettingsError(lambda n: f"{n(name)} must be a number {what}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(lambda n: f"{n(name)} must be a number {what}, got {value!r}") from None


def check_param_ratio(value, name: str = "target_param_ratio") -> float:
    """The one rule for a target fraction of a model's parameters: a finite number in (0, 1] (factorizing towards
    a target only removes parameters; overcomplete factors are chosen with a rank scale >= 1)."""
    t = _number(name, value, "in (0, 1]")
    if not math.isfinite(t) or t <= 0:
        raise SettingsError(lambda n: f"{n(name)} must be a number in (0, 1], got {value!r}")
    if t > 1:
        raise SettingsError(
            lambda n: (
                f"{n(name)} must be a number in (0, 1], got {value!r}: keeping more parameters "
                "than the model has would need factorized layers larger than the dense ones; "
                "ask for a smaller fraction (overcomplete factors come from a rank scale >= 1)"
            )
        )
    return t


def check_damping(value, name: str = "damping") -> float:
    """The one rule for the damping of a second moment (activation-aware truncation): a finite number >= 0."""
    d = _number(name, value, ">= 0")
    if not (math.isfinite(d) and d >= 0):
        raise SettingsError(
            lambda n: (
                f"{n(name)} must be a finite number >= 0 (relative damping of the inputs' "
                f"second moment; default {DEFAULT_DAMPING}), got {value!r}"
            )
        )
    return d


def fits_heads(value, full: int) -> bool:
    """Whether ``value`` is a valid reduced per-head dimension of heads of dimension ``full`` (heads only shrink)."""
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= full


def shrink_message(label: str, value, full: int, where: str = "") -> str:
    return (
        f"{label} {value} does not fit {where or 'the attention'}: its heads have dimension {full} and can only "
        f"shrink; use an integer in [1, {full}]"
    )


def check_shrink(label: str, value, full: int, where: str = "") -> int:
    """The shrink-only rule of attention heads: a per-head dimension must be an integer in ``[1, full]``."""
    if not fits_heads(value, full):
        raise ValueError(shrink_message(label, value, full, where))
    return value


def _head_dim_error(source: str, form: str, value: int, full: int, where: str, scale) -> SettingsError:
    def message(n: Namer) -> str:
        if source == "rank_scale":
            return shrink_message(
                f"the {form.upper()} head dim",
                f"{value} (from {n('rank_scale')} {scale:g} with 'attention' in {n('factorize')})",
                full,
                where,
            )
        return shrink_message(n(source), value, full, where)

    return SettingsError(message)


def specific_head_dims(
    head_dim: Optional[int], head_dim_qk: Optional[int], head_dim_ov: Optional[int]
) -> Tuple[Optional[int], Optional[int]]:
    """``(head_dim_qk, head_dim_ov)`` from the converters' convenience ``head_dim`` (both forms) and the specific
    ones: the specific value overrides the general one."""
    _positive_int("head_dim", head_dim, hint=" (the reduced per-head dimension; None keeps the model's)")
    return (head_dim if head_dim_qk is None else head_dim_qk), (head_dim if head_dim_ov is None else head_dim_ov)


def parse_parts(value) -> Tuple[str, ...]:
    """Parts to factorize from a sequence or a comma-separated string, in order, without repeats."""
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    try:
        parts = tuple(value)
    except TypeError:
        raise SettingsError(
            lambda n: f"{n('factorize')} must be a list of parts among {list(PARTS)}, got {value!r}"
        ) from None
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        hint = " ('embeddings' is now spelled 'embedding')" if "embeddings" in unknown else ""
        raise SettingsError(lambda n: f"{n('factorize')}: unknown part(s) {unknown}; choose among {list(PARTS)}{hint}")
    if not parts:
        raise SettingsError(
            lambda n: f"{n('factorize')} must name at least one part among {list(PARTS)}, got {value!r}"
        )
    return tuple(dict.fromkeys(parts))


def _ranks_key_error(pattern) -> SettingsError:
    return SettingsError(
        lambda n: f"{n('ranks')}: keys must be module-name patterns (non-empty strings), got {pattern!r}"
    )


def _coefficient_error(name: str, value) -> SettingsError:
    return SettingsError(
        lambda n: f"{n(name)} must be a finite number >= 0 (Frobenius decay coefficient; 0 turns it off), got {value!r}"
    )


def parse_ranks(value) -> Dict[str, int]:
    """Per-module ranks from a mapping, or a string ``"PATTERN=RANK,PATTERN=RANK"`` (command lines)."""
    if isinstance(value, str):
        out: Dict[str, Any] = {}
        for item in (s.strip() for s in value.split(",") if s.strip()):
            pattern, sep, rank = item.rpartition("=")
            if not sep or not pattern.strip():
                raise SettingsError(
                    lambda n: f"{n('ranks')} must be PATTERN=RANK pairs separated by commas, got {value!r}"
                )
            try:
                out[pattern.strip()] = int(rank)
            except ValueError:
                out[pattern.strip()] = rank
        value = out
    if not isinstance(value, Mapping):
        raise SettingsError(lambda n: f"{n('ranks')} must be a dict {{module name pattern: rank}}, got {value!r}")
    for pattern, rank in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise _ranks_key_error(pattern)
        _positive_int(f"ranks[{pattern!r}]", rank, allow_none=False)
    return dict(value)


# ---------------------------------------------------------------------------------------------------- specs
def _help(text: str, choices: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
    return {"help": text} if choices is None else {"help": text, "choices": choices}


def _choice(name: str, value, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise SettingsError(lambda n: f"{n(name)} must be one of {list(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class StructureSpec:
    """What is factorized, at which rank, and how it starts (validated on construction, immutable)."""

    rank_scale: Optional[float] = field(
        default=None,
        metadata=_help(
            "factorize the parts in factorize at rank round(R * min(m, n)) per layer (R < 1 compresses, R >= 1 is "
            "overcomplete); with 'attention' in factorize heads shrink to max(1, int(R * head_dim)); "
            "default: no rank scale"
        ),
    )
    factorize: Tuple[str, ...] = field(
        default=("ffn", "embedding"),
        metadata=_help(
            "parts the rank scale factorizes, among ffn (feed-forward layers), embedding (token embeddings and an "
            "untied output embedding), position (learned positional embeddings) and attention (head dims)"
        ),
    )
    ranks: Mapping[str, int] = field(
        default_factory=dict,
        metadata=_help(
            "per-module ranks {glob over qualified module names: rank} (first match wins over the rank scale; a "
            "pattern matching no layer is an error); command line: PATTERN=RANK,..."
        ),
    )
    target_param_ratio: Optional[float] = field(
        default=None,
        metadata=_help(
            "instead of a rank scale, the one whose factorized model keeps this fraction of the parameters, in (0, 1]"
        ),
    )
    head_dim_qk: Optional[int] = field(
        default=None,
        metadata=_help(
            "reduced per-head dimension of the attention QK forms (None: keep, or the rank scale with 'attention')"
        ),
    )
    head_dim_ov: Optional[int] = field(
        default=None,
        metadata=_help(
            "reduced per-head dimension of the attention OV forms (None: keep, or the rank scale with 'attention')"
        ),
    )
    spectral_init: bool = field(
        default=True,
        metadata=_help(
            "spectral initialization (SI, Definition 3.1) of factorized layers and of shrunk heads; False draws "
            "fresh random factors / projections"
        ),
    )
    spectral_init_qk: Optional[bool] = field(
        default=None,
        metadata=_help(
            "per-head SI of the QK forms: None follows spectral_init where the heads shrink and leaves full-size "
            "heads untouched; True at full head dim re-balances each head's factors (function unchanged); False "
            "where heads shrink draws random projections"
        ),
    )
    spectral_init_ov: Optional[bool] = field(
        default=None, metadata=_help("per-head SI of the OV forms (as spectral_init_qk)")
    )
    factor_init: str = field(
        default="random",
        metadata=_help(
            "factors of layers factorized without SI: random (each factor initialized as its own nn.Linear would be, "
            "Kaiming-uniform) or dense (each factor drawn entry by entry from the dense layer's own initialization, "
            "the rule of the paper's official code)",
            FACTOR_INITS,
        ),
    )
    reduced_heads: str = field(
        default="truncate",
        metadata=_help(
            "how shrunk heads start and score: truncate (SI keeps each full-size head's best rank-r approximation, "
            "scores scaled by 1/sqrt(original head dim), so the shrunk model is the truncated dense one) or fresh "
            "(projections drawn at the reduced dims by the model's initialization, SI re-balances each reduced head's "
            "own product, scores scaled by 1/sqrt(reduced head dim): the rule of the paper's official code)",
            HEAD_RULES,
        ),
    )
    deep: bool = field(
        default=False,
        metadata=_help(
            "overcomplete U M V^T factors (M starts at the identity), multiplied out after training (Sec. 5)"
        ),
    )
    activation_aware: bool = field(
        default=False,
        metadata=_help(
            "SI of pretrained weights in the norm of each layer's outputs on calibration data instead of the weights' "
            "norm (the inputs' second moments; token frequencies for embeddings; per head for shrunk QK/OV forms); "
            "needs calibration data when the model is patched, so HuggingFace only (fairseq models train from scratch)"
        ),
    )
    damping: float = field(
        default=DEFAULT_DAMPING,
        metadata=_help(
            "with activation_aware: the inputs' second moment C is damped to C + damping * mean(diag C) * I, which "
            "keeps input directions the calibration data never visited (0: no damping)"
        ),
    )

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        if self.rank_scale is not None:
            r = _number("rank_scale", self.rank_scale, "> 0")
            if not math.isfinite(r) or r <= 0:
                raise SettingsError(
                    lambda n: (
                        f"{n('rank_scale')} must be a finite number > 0 (< 1 compresses, "
                        f">= 1 is overcomplete), got {self.rank_scale!r}"
                    )
                )
            set_("rank_scale", r)
        set_("factorize", parse_parts(self.factorize))
        set_("ranks", parse_ranks(self.ranks))
        if self.target_param_ratio is not None:
            set_("target_param_ratio", check_param_ratio(self.target_param_ratio))
            if self.rank_scale is not None:
                raise SettingsError(lambda n: f"give {n('rank_scale')} or {n('target_param_ratio')}, not both")
            if "attention" in self.factorize and self.head_dim_qk is None and self.head_dim_ov is None:
                raise SettingsError(
                    lambda n: (
                        f"{n('target_param_ratio')} sets the rank scale of FFN/embedding layers only: with 'attention' "
                        f"in {n('factorize')} give {n('head_dim_qk')}/{n('head_dim_ov')} explicitly, or drop "
                        "'attention'"
                    )
                )
        for name in ("head_dim_qk", "head_dim_ov"):
            _positive_int(name, getattr(self, name), hint=" (the reduced per-head dimension; None keeps the model's)")
        for name in ("spectral_init", "deep", "activation_aware"):
            _boolean(name, getattr(self, name))
        for name in ("spectral_init_qk", "spectral_init_ov"):
            _boolean(name, getattr(self, name), allow_none=True)
        _choice("factor_init", self.factor_init, FACTOR_INITS)
        _choice("reduced_heads", self.reduced_heads, HEAD_RULES)
        if self.deep and not self.factorizes:
            raise SettingsError(
                lambda n: (
                    f"{n('deep')} needs {n('rank_scale')}, {n('ranks')} or "
                    f"{n('target_param_ratio')} (which layers to factorize at which rank)"
                )
            )
        set_("damping", check_damping(self.damping))
        if self.activation_aware:
            if not self.spectral_init:
                raise SettingsError(
                    lambda n: (
                        f"{n('activation_aware')} is spectral initialization in the norm of the "
                        f"outputs: it needs {n('spectral_init')} (drop one of them)"
                    )
                )
            if not self.factorizes and self.head_dim_qk is None and self.head_dim_ov is None:
                raise SettingsError(
                    lambda n: (
                        f"{n('activation_aware')} truncates nothing: give {n('rank_scale')}, "
                        f"{n('ranks')}, {n('target_param_ratio')} or a reduced head dim"
                    )
                )
        elif self.damping != DEFAULT_DAMPING:
            raise SettingsError(
                lambda n: (
                    f"{n('damping')} applies to activation-aware truncation only: set "
                    f"{n('activation_aware')} too, or leave {n('damping')} at its default"
                )
            )

    def __hash__(self):  # ranks is a dict
        return hash(tuple((f.name, repr(getattr(self, f.name))) for f in fields(self)))

    @property
    def factorizes(self) -> bool:
        """Whether any FFN / embedding layer may be factorized (a rank scale, a budget or per-module ranks)."""
        return self.rank_scale is not None or self.target_param_ratio is not None or bool(self.ranks)

    @property
    def layer_init(self) -> str:
        """Initialization of factorized layers (a key of :data:`~fnl_transformers.core.INIT_METHODS`):
        ``"spectral"`` (SI), ``"activation"`` (SI in the norm of the layer's outputs on calibration data), else
        ``factor_init`` (``"random"`` or ``"dense"``)."""
        if not self.spectral_init:
            return self.factor_init
        return "activation" if self.activation_aware else "spectral"

    def head_dims(self, original: int, where: str = "") -> Tuple[int, int]:
        """``(qk, ov)`` per-head dimensions of an attention whose heads have ``original`` dimensions: the specific
        ``head_dim_qk`` / ``head_dim_ov``, else ``max(1, int(rank_scale * original))`` when ``'attention'`` is in
        ``factorize`` (floor, the official code's rule), else ``original``. Heads only shrink."""
        out = []
        for form in HEAD_FORMS:
            source = f"head_dim_{form}"
            value = getattr(self, source)
            if value is None and "attention" in self.factorize and self.rank_scale is not None:
                value, source = max(1, int(self.rank_scale * original)), "rank_scale"
            if value is None:
                value = original
            if not fits_heads(value, original):
                raise _head_dim_error(source, form, value, original, where, self.rank_scale)
            out.append(value)
        return out[0], out[1]

    def head_init(self, form: str, shrinks: bool) -> Optional[str]:
        """How a head form (``"qk"``/``"ov"``) starts: ``"spectral"`` (per-head SI of the current heads: truncated
        where they shrink, re-balanced at full dim), ``"activation"`` (per-head SI in the norm of the scores /
        outputs on calibration data, where the heads shrink and ``activation_aware`` is set), ``"random"`` (fresh
        projections), ``"balanced"`` (fresh projections at the reduced dim, each head's own product then
        re-balanced: ``reduced_heads='fresh'`` with SI, which has no trained heads to truncate), or ``None`` (left
        exactly as it is)."""
        chosen = getattr(self, f"spectral_init_{form}")
        si = self.spectral_init if chosen is None else chosen
        if not shrinks:
            return "spectral" if chosen else None
        if self.reduced_heads == "fresh":
            return "balanced" if si else "random"
        if not si:
            return "random"
        return "activation" if self.activation_aware else "spectral"

    def score_head_dim(self, original: int, qk: int) -> int:
        """The head dimension ``d`` of the score scaling ``1/sqrt(d)`` of heads of ``original`` dimension whose QK
        forms have dimension ``qk``: ``original`` (``reduced_heads='truncate'``: SI stays exact) or ``qk``
        (``'fresh'``, the official code's rule)."""
        return qk if self.reduced_heads == "fresh" else original


@dataclass(frozen=True)
class FDSpec:
    """Frobenius decay ``lambda/2 ||W||_F^2`` on the product of each form (paper Definition 3.2)."""

    linear: float = field(
        default=0.0, metadata=_help("FD coefficient of factorized linear (FFN) layers; 0 turns it off")
    )
    embedding: Optional[float] = field(
        default=None,
        metadata=_help("FD coefficient of factorized embeddings (None: the same as the linear coefficient)"),
    )
    qk: float = field(default=0.0, metadata=_help("FD coefficient of the attention QK forms W_q,h W_k,h^T"))
    ov: float = field(default=0.0, metadata=_help("FD coefficient of the attention OV forms W_o,h W_v,h"))
    mode: str = field(
        default="coupled",
        metadata=_help("coupled: FD in the loss; decoupled: FD applied by the optimizer (FLAMBe / AdamWFD)", FD_MODES),
    )

    def __post_init__(self):
        for kind in KINDS:
            value = getattr(self, kind)
            if value is None and kind == "embedding":
                continue
            name = f"fd_{kind}"
            x = _number(name, value, ">= 0 (a Frobenius decay coefficient)")
            if not (math.isfinite(x) and x >= 0):
                raise _coefficient_error(name, value)
            object.__setattr__(self, kind, x)
        if self.mode not in FD_MODES:
            raise SettingsError(lambda n: f"{n('fd_mode')} must be one of {list(FD_MODES)}, got {self.mode!r}")

    def coefficients(self) -> Dict[str, float]:
        """``{kind: lambda}`` for every kind (the embedding coefficient resolved)."""
        return {
            "linear": self.linear,
            "embedding": self.linear if self.embedding is None else self.embedding,
            "qk": self.qk,
            "ov": self.ov,
        }

    @property
    def active(self) -> Tuple[str, ...]:
        """Kinds with a nonzero coefficient."""
        return tuple(k for k, v in self.coefficients().items() if v > 0)

    @property
    def coupled(self) -> bool:
        """FD in the loss (some coefficient nonzero, mode ``coupled``)."""
        return self.mode == "coupled" and bool(self.active)

    @property
    def decoupled(self) -> bool:
        """FD in the optimizer (some coefficient nonzero, mode ``decoupled``)."""
        return self.mode == "decoupled" and bool(self.active)

    def check_present(self, present: Iterable[str]) -> None:
        """Refuse a nonzero coefficient none of whose kinds the model has (``fd_linear`` covers the embeddings
        too while ``fd_embedding`` is None)."""
        present = set(present)
        idle = []
        for kind in KINDS:
            if kind == "embedding" and self.embedding is None:
                continue
            covers = {kind} | ({"embedding"} if kind == "linear" and self.embedding is None else set())
            if getattr(self, kind) > 0 and not covers & present:
                idle.append((f"fd_{kind}", covers))
        if idle:
            kinds = "/".join(sorted(set().union(*(c for _, c in idle))))
            raise SettingsError(
                lambda n: (
                    f"{', '.join(n(name) for name, _ in idle)} > 0 but the model has no {kinds} forms to decay "
                    f"(it has {sorted(present)}): factorize those layers ({n('rank_scale')}) or register the "
                    "attention forms, or set the coefficient to 0"
                )
            )


def check_fd_coefficients(linear=0.0, embedding=0.0, qk=0.0, ov=0.0) -> Dict[str, float]:
    """``{kind: coefficient}`` as floats; one clear error for a negative, NaN or infinite coefficient."""
    try:
        return FDSpec(linear, embedding, qk, ov).coefficients()
    except SettingsError as e:
        raise e.spelled(lambda name: f"FD coefficient for {name[3:]!r}") from None


# ---------------------------------------------------------------------------------------------- flat settings
HEAD_DIM_HELP = "reduced per-head dimension of both attention forms (head_dim_qk / head_dim_ov override it)"


@dataclass(frozen=True)
class Setting:
    """One flat setting: its name in ``FNLConfig`` (fairseq flag: ``--`` + name with dashes), the core spec and
    field it sets (``spec`` is empty for the converters' convenience ``head_dim``), default, meaning, and the
    type of its values (``"float"``, ``"int"``, ``"bool"``, ``"str"``; ``optional`` when ``None`` is allowed;
    ``factorize`` and ``ranks`` take strings on a command line)."""

    name: str
    spec: str
    field: str
    default: Any
    help: str
    type: str = "str"
    optional: bool = False
    choices: Optional[Tuple[str, ...]] = None


def _value_type(annotation: str) -> Tuple[str, bool]:
    for t in ("bool", "float", "int"):
        if annotation in (t, f"Optional[{t}]"):
            return t, annotation.startswith("Optional")
    return "str", annotation.startswith("Optional")


def flat_settings() -> List[Setting]:
    """Every flat setting, in ``FNLConfig`` order: the structure fields, ``head_dim``, the FD fields (``fd_``
    prefix) and the decay policy's ``weight_decay_factors``."""
    from .policy import DecayPolicy

    def default(f):
        return f.default_factory() if callable(f.default_factory) else f.default

    def setting(name, spec, f):
        return Setting(
            name, spec, f.name, default(f), f.metadata["help"], *_value_type(str(f.type)), f.metadata.get("choices")
        )

    out = []
    for f in fields(StructureSpec):
        if f.name == "head_dim_qk":
            out.append(Setting("head_dim", "", "", None, HEAD_DIM_HELP, "int", True))
        out.append(setting(f.name, "StructureSpec", f))
    for f in fields(FDSpec):
        out.append(setting(f"fd_{f.name}", "FDSpec", f))
    out.append(
        setting(
            "weight_decay_factors",
            "DecayPolicy",
            next(f for f in fields(DecayPolicy) if f.name == "weight_decay_factors"),
        )
    )
    return out


def specs_from_flat(values: Mapping[str, Any], namer: Namer = _plain):
    """``(StructureSpec, FDSpec, weight_decay_factors)`` from flat settings (missing ones take their defaults);
    errors name the settings with ``namer``."""
    get = lambda name, default=None: values.get(name, default)  # noqa: E731
    try:
        qk, ov = specific_head_dims(get("head_dim"), get("head_dim_qk"), get("head_dim_ov"))
        structure_fields = {f.name for f in fields(StructureSpec)} - {"head_dim_qk", "head_dim_ov"}
        structure = StructureSpec(
            head_dim_qk=qk, head_dim_ov=ov, **{k: values[k] for k in structure_fields if values.get(k) is not None}
        )
        fd = FDSpec(
            **{f.name: values[f"fd_{f.name}"] for f in fields(FDSpec) if values.get(f"fd_{f.name}") is not None}
        )
        wdf = values.get("weight_decay_factors")
        wdf = True if wdf is None else _boolean("weight_decay_factors", wdf)
    except SettingsError as e:
        raise e.spelled(namer) from None
    return structure, fd, wdf


__all__ = [
    "DEFAULT_DAMPING",
    "FACTOR_INITS",
    "FD_MODES",
    "FDSpec",
    "HEAD_FORMS",
    "HEAD_RULES",
    "KINDS",
    "PARTS",
    "Setting",
    "SettingsError",
    "StructureSpec",
    "check_damping",
    "check_fd_coefficients",
    "check_shrink",
    "fits_heads",
    "flag",
    "flat_settings",
    "parse_parts",
    "parse_ranks",
    "shrink_message",
    "specific_head_dims",
    "specs_from_flat",
]

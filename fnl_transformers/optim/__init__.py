"""Optimizers with decoupled Frobenius decay (Khodak et al., ICLR 2021): ``Lamb``, ``FLAMBe``, ``AdamWFD``.

All three are plain ``torch.optim.Optimizer`` s (param groups, ``zero_grad``, ``state_dict``/``load_state_dict``),
usable directly, from a HuggingFace ``Trainer`` (``optimizers=(opt, scheduler)``) or wrapped by a training
framework (fairseq plugin). API:

* ``param_groups(model, fd_linear=0, fd_embedding=None, fd_qk=0, fd_ov=0, weight_decay=0.0,
  no_decay=default_no_decay, params=None, weight_decay_factors=True) -> list of groups``, by the one decay
  policy (:class:`fnl_transformers.core.DecayPolicy`): an FD group (factors of forms whose kind has a nonzero
  coefficient: ``weight_decay=0``, ``fd={kind: lambda}``, ``fd_forms`` = form specs keyed by indices into the
  group's params, plain dicts), a decay group (``weight_decay``) and a no-decay group (biases, normalization
  layers; factors without FD too with ``weight_decay_factors=False``). ``params`` restricts to a given flat
  list (e.g. the trainable parameters a framework passes its optimizer).
* ``Lamb(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
  trust_clip=None, max_grad_norm=None)``: LAMB as NVIDIA's BERT recipe (NVLAMB); trust ratio
  ``||w|| / ||r||``, 1 when either norm is 0. Rejects groups with active FD.
* ``FLAMBe(...)``: same arguments; in groups with ``fd``/``fd_forms`` the decay term of form factors is
  ``lambda_kind * dFD/dw``. ``FLAMBe(model.parameters())`` (a flat list, no forms) is ``Lamb``.
* ``AdamWFD(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)``: AdamW, same FD groups.
* ``lamb_update`` / ``adamw_update``: the update math on lists of tensors (what ``step()`` calls).

Typical use, the paper's BERT setting (FD on the attention OV forms, regular decay elsewhere)::

    from fnl_transformers.optim import FLAMBe, param_groups
    opt = FLAMBe(param_groups(model, fd_ov=1e-2, weight_decay=0.01), lr=1e-3)

A group's FD coefficients may be changed during training (``group["fd"]["ov"] = ...``), like its ``lr``.

Half-precision parameters (float16 / bfloat16, as fairseq's ``--memory-efficient-fp16`` hands them) are updated in
float32: float32 moments, the update and decoupled FD computed in float32, the result rounded into the parameter
once (``supports_memory_efficient_fp16``).
"""

from ..core import default_no_decay
from .adamw import AdamWFD, adamw_update
from .groups import param_groups
from .lamb import FLAMBe, Lamb, lamb_update

__all__ = ["AdamWFD", "FLAMBe", "Lamb", "adamw_update", "default_no_decay", "lamb_update", "param_groups"]

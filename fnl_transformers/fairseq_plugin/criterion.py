"""``fd_label_smoothed_cross_entropy``: label-smoothed cross entropy plus Frobenius decay of the model's forms.

Paper: Khodak et al., ICLR 2021, Definition 3.2: ``lambda/2 ||U V^T||_F^2`` on each factorized form, in place of
weight decay on the factors; Sec. 2.3, Eq. (1): the attention QK and OV forms get separate coefficients.

The coefficients are the model's: ``--fd-linear``, ``--fd-embedding``, ``--fd-qk``, ``--fd-ov`` and
``--fd-mode`` are options of ``--arch fnl_transformer*``, and the criterion reads the one FD spec the model holds
(``model.fnl_fd``, :class:`fnl_transformers.core.FDSpec`). With ``--fd-mode coupled`` (default) the penalty is
added to the loss; with ``decoupled`` the optimizer (``flambe``) applies FD and the loss has none.

The penalty ``P = sum_kind lambda_kind / 2 sum_forms ||W||_F^2`` (:func:`fnl_transformers.core.
frobenius_penalty_by_kind`) counts exactly once per update whatever ``--update-freq`` and the number of workers:
fairseq sums ``loss_b`` over the micro-batches ``b`` of all workers and divides the summed gradient by the total
sample size ``S = sum_b s_b``; each micro-batch adds ``P * s_b``, so the update sees
``sum_b P s_b / S = P`` (and the same for its gradient). Validation (``model.training`` false) skips it.

Mixed precision (``--fp16``, ``--bf16``, ``--memory-efficient-fp16/-bf16``, ``--amp``): the penalty is computed in
float32 from the (possibly half-precision) factors, with autocast off, and added to the loss this criterion returns,
before fairseq's loss scaler multiplies it: it is scaled, unscaled and skipped on overflow exactly as the cross
entropy. The logged ``fd_<kind>`` values are never scaled (:mod:`fnl_transformers.fairseq_plugin.precision`).

Logged per update: ``loss``/``nll_loss`` as fairseq's criterion (cross entropy only, comparable with runs
without FD), ``fd_<kind>``: the penalty of each active kind (nats, the same normalization as the per-token loss),
and with ``--form-diagnostics-interval N`` every N updates, per kind (means over forms; heads count separately):
``form/<kind>/frobenius`` ``||W||_F``, ``form/<kind>/nuclear`` ``||W||_*``, ``form/<kind>/wd_bound``
``(||A||_F^2 + ||B||_F^2)/2`` (what weight decay penalizes; >= nuclear) and ``form/<kind>/eff_step``
``lr / ||W||_F^2`` (:func:`fnl_transformers.core.form_diagnostics`). With ``--tensorboard-logdir`` they are
written to tensorboard like every other training scalar.
"""
# (no `from __future__ import annotations`: fairseq reads the config dataclasses' field types at runtime)

from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import metrics, utils
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from ..core import KINDS, form_diagnostics, frobenius_penalty_by_kind


@dataclass
class FDLabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    form_diagnostics_interval: int = field(
        default=0,
        metadata={
            "help": "log Frobenius / nuclear norms, the weight-decay bound and the effective step "
            "of each form kind every N updates (0: never)"
        },
    )


def _current_lr() -> Optional[float]:
    meter = metrics.get_meter("default", "lr")
    return None if meter is None or getattr(meter, "val", None) is None else float(meter.val)


class FDLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        form_diagnostics_interval=0,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if (
            isinstance(form_diagnostics_interval, bool)
            or int(form_diagnostics_interval) != form_diagnostics_interval
            or form_diagnostics_interval < 0
        ):
            raise ValueError(f"--form-diagnostics-interval must be an integer >= 0, got {form_diagnostics_interval!r}")
        self.diag_interval = int(form_diagnostics_interval)
        self._diag_update = -1

    def forward(self, model, sample, reduce=True):
        fd = getattr(model, "fnl_fd", None)
        if fd is None:
            raise ValueError(
                f"--criterion fd_label_smoothed_cross_entropy reads its FD coefficients from the model, but "
                f"{type(model).__name__} holds none: use --arch fnl_transformer* (where --fd-* are model options), "
                "or --criterion label_smoothed_cross_entropy"
            )
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        if not model.training:
            return loss, sample_size, logging_output  # FD is a training regularizer: not in validation
        # FD in float32 from the factors, whatever their dtype, also under --amp (fairseq runs the criterion in
        # autocast): the penalty and its gradient never see half-precision matmuls
        with torch.autocast(loss.device.type, enabled=False):
            if fd.coupled:
                parts = frobenius_penalty_by_kind(model, **fd.coefficients())
                # counts once per update: sum_b P s_b / sum_b s_b = P (module docstring); added to the loss before
                # any loss scaling, so fairseq scales and unscales it exactly as the cross entropy
                loss = loss + torch.stack(list(parts.values())).sum().to(loss.dtype) * sample_size
                for kind, value in parts.items():
                    logging_output[f"fd_{kind}"] = value.detach() * sample_size
            if self.diag_interval:
                n = getattr(model, "fnl_num_updates", None)
                if n is not None and n % self.diag_interval == 0 and n != self._diag_update:
                    self._diag_update = n  # once per update (first micro-batch)
                    for key, value in form_diagnostics(model, lr=_current_lr()).items():
                        logging_output[f"form/{key}"] = value
                    logging_output["form_count"] = 1
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = utils.item(sum(log.get("sample_size", 0) for log in logging_outputs))
        for kind in KINDS:
            key = f"fd_{kind}"
            if any(key in log for log in logging_outputs) and sample_size > 0:
                total = utils.item(sum(log.get(key, 0) for log in logging_outputs))
                metrics.log_scalar(key, total / sample_size, sample_size, round=6)
        count = utils.item(sum(log.get("form_count", 0) for log in logging_outputs))
        if count > 0:
            keys = sorted({k for log in logging_outputs for k in log if k.startswith("form/")})
            for key in keys:
                metrics.log_scalar(
                    key, utils.item(sum(log.get(key, 0) for log in logging_outputs)) / count, count, round=6
                )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True

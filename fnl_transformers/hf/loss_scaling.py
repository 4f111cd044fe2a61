"""Loss scaling under gradient accumulation and data parallelism, for models that ignore ``num_items_in_batch``.

``Trainer`` passes ``num_items_in_batch`` (the label count of the whole accumulated, and with
``average_tokens_across_devices`` global, batch) to every model whose ``forward`` takes ``**kwargs`` and then
assumes the returned loss is a sum divided by that count, never dividing it by the accumulation steps. Models
whose loss goes through ``self.loss_function`` (GPT-2, Llama) do that; others (BERT's MLM head, for one) ignore it
and return a per-micro-batch mean, so their gradients come out ``gradient_accumulation_steps`` times too large
and token weighting is lost. :func:`watch_num_items` watches each forward's ``loss_function`` call; if
``num_items_in_batch`` did not reach it, the caller reweights the model's mean by ``n_micro / num_items_in_batch``
(:func:`label_count`: the micro-batch's label tokens, counted as ``Trainer`` counts them). Either way one update
with accumulation equals one update on the large batch. (Exact for models whose own mean is over the labels that
are not ``-100``.)
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel


def label_count(inputs: dict, shift: bool = False) -> Optional[int]:
    """Number of label entries that are not ``-100`` in one micro-batch, counted as ``Trainer`` counts
    ``num_items_in_batch`` (``shift_labels`` if given, else ``labels[..., 1:]`` for causal-LM losses)."""
    labels = inputs.get("shift_labels")
    if labels is None:
        labels = inputs.get("labels")
        if labels is None or not torch.is_tensor(labels):
            return None
        if shift:
            labels = labels[..., 1:]
    return int(labels.ne(-100).sum())


class NumItemsSpy:
    """Stands in for a model's ``loss_function`` during one forward and records whether ``num_items_in_batch``
    reached it (then the model's loss is a sum over the accumulated batch divided by that count)."""

    def __init__(self, module: nn.Module):
        self.module, self.used = module, False
        self.own = vars(module).get("_loss_function")  # a loss function the user set on the model, if any

    def __call__(self, *args, **kwargs):
        self.used = self.used or kwargs.get("num_items_in_batch") is not None
        return self._function()(*args, **kwargs)

    def _function(self):
        if self.own is not None:
            return self.own
        del self.module._loss_function  # the model's own choice (from its loss_type), then the spy goes back
        try:
            return self.module.loss_function
        finally:
            self.module._loss_function = self


@contextlib.contextmanager
def watch_num_items(model: nn.Module):
    """Spy on the ``loss_function`` of every ``PreTrainedModel`` inside ``model`` for one forward."""
    spies = [NumItemsSpy(m) for m in model.modules() if isinstance(m, PreTrainedModel)]
    try:
        for spy in spies:
            spy.module._loss_function = spy
        yield spies
    finally:
        for spy in spies:
            if spy.own is not None:
                spy.module._loss_function = spy.own
            else:
                vars(spy.module).pop("_loss_function", None)


def zero_with_graph(outputs) -> torch.Tensor:
    """An exact zero that still reaches the parameters (the mean over zero labels is NaN)."""
    logits = outputs.get("logits") if isinstance(outputs, dict) else None
    if logits is None:
        raise ValueError("a micro-batch has no labels != -100 and the model returned no logits to build a zero loss")
    return logits.sum() * 0.0


__all__ = ["NumItemsSpy", "label_count", "watch_num_items", "zero_with_graph"]

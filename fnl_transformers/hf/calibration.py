"""Calibration statistics of a HuggingFace model: what each layer reads, from one forward pass over text.

:func:`collect_input_stats` runs ``texts`` through the model once (eval mode, no gradients, batches padded to the
longest text) with forward pre-hooks on its layers and returns, per qualified module name:

* ``nn.Linear`` / GPT-2's ``Conv1D``: :class:`~fnl_transformers.core.activation.InputStats` of the inputs (second
  moment ``E[x x^T]`` and mean, over real tokens: padding positions are left out);
* ``nn.Embedding``: :class:`~fnl_transformers.core.activation.TokenCounts`, how often each id was looked up;
* with ``attention=`` (attention modules whose forward returns ``(output, attention probabilities)``, as the
  attention modules of BERT, GPT-2 and Llama do): :class:`~fnl_transformers.core.activation.HeadInputStats` of each
  head's attention-weighted inputs ``z_h,i = sum_j a_h,ij x_j``, the exact statistics of the OV forms (the pass
  then runs with transformers' eager attention, which computes the probabilities; the previous implementation is
  restored afterwards). Memory: ``heads * d^2`` float64 numbers per module.

The attention input of a self-attention layer is the input of its query projection, so per-head QK/OV truncation
reads the statistics of that projection. These are exactly the inputs of
:mod:`fnl_transformers.core.activation` (``activation_init(W, rank, stats[name].second_moment)``,
``embedding_activation_init(E, rank, stats[name].counts)``, ``attention_activation_init(..., stats[q].second_moment,
stats[q].mean)``).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..core.activation import HeadInputStats, InputStats, TokenCounts
from ..core.texts import check_texts, read_texts  # noqa: F401  (the rule for text lists and files, torch-free)

Stats = Union[InputStats, TokenCounts, HeadInputStats]


def batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, device) -> Iterable[dict]:
    """Tokenized batches (padded to the longest text of the batch, truncated to ``max_length``) on ``device``."""
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padding positions are masked anyway
        tokenizer = _with_pad(tokenizer)
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield {k: v.to(device) for k, v in enc.items()}


def _with_pad(tokenizer):
    import copy

    tok = copy.copy(tokenizer)
    tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with; set tokenizer.pad_token")
    return tok


def _default_modules(model: nn.Module) -> Dict[str, nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D, nn.Embedding))}


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    weight = getattr(module, "weight", None)  # Conv1D: weight is in x out
    if weight is None or weight.dim() != 2:
        raise ValueError(f"cannot record inputs of {type(module).__name__}: not a linear or embedding layer")
    return weight.shape[0]


def _real_tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The positions of ``x`` (``batch x length x ...`` or broadcastable to the mask) that hold real tokens."""
    if mask is None or x.dim() < 2:
        return x
    lead = x.shape[:2]
    if lead == mask.shape:
        return x[mask]
    if lead[0] == 1 and lead[1] == mask.shape[1]:  # e.g. position ids shared by the batch
        return x.expand(mask.shape[0], *x.shape[1:])[mask]
    return x


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    modules: Optional[Union[Sequence[str], Callable[[str, nn.Module], bool]]] = None,
    attention: Sequence[str] = (),
    batch_size: int = 16,
    max_length: int = 128,
) -> Dict[str, Stats]:
    """Input statistics of ``model``'s layers over ``texts`` (one forward pass; see the module docstring).

    ``modules``: qualified names, or a predicate ``(name, module) -> bool`` over the default set (every
    ``nn.Linear``, ``Conv1D`` and ``nn.Embedding``); default all of them. ``attention``: qualified names of
    attention modules whose per-head mixed-input statistics to record (keyed by the same names). The model is left
    in the mode (and attention implementation) it was in.
    """
    texts = check_texts(texts)
    if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"batch_size and max_length must be positive integers, got {batch_size}, {max_length}")
    candidates = _default_modules(model)
    if modules is None:
        chosen = candidates
    elif callable(modules):
        chosen = {n: m for n, m in candidates.items() if modules(n, m)}
    else:
        names = list(modules)
        unknown = [n for n in names if n not in candidates]
        if unknown:
            raise ValueError(
                f"modules {unknown[:3]} are not linear or embedding layers of the model "
                f"(names look like {list(candidates)[:3]})"
            )
        chosen = {n: candidates[n] for n in names}
    attention = list(attention)
    missing = [n for n in attention if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"attention modules {missing[:3]} are not modules of the model")
    if not chosen and not attention:
        raise ValueError("no linear or embedding layer selected: nothing to calibrate")
    device = next(model.parameters()).device
    state: dict = {"mask": None, "sums": {}}
    stats: Dict[str, Stats] = {}
    handles = []

    def hook_for(name: str, module: nn.Module):
        n = _in_features(module)
        if isinstance(module, nn.Embedding):
            stats[name] = TokenCounts(n, device=device)

            def hook(mod, args):
                stats[name].update(_real_tokens(args[0], state["mask"]))
        else:
            stats[name] = InputStats(n, device=device)

            def hook(mod, args):  # q, k and v read the same tensor object: its sums are computed once
                x = args[0]
                cached = state["sums"].get(id(x))  # the cache holds x, so its id is not reused this batch
                if cached is None or cached[0] is not x:
                    cached = state["sums"][id(x)] = (x, InputStats.batch_sums(_real_tokens(x, state["mask"])))
                stats[name].update(x, cached[1])

        return hook

    def mixing_hook_for(name: str):
        def hook(mod, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None or probs.dim() != 4:
                raise ValueError(
                    f"{name} returned no attention probabilities; per-head statistics need an attention "
                    "module whose forward returns (output, probabilities)"
                )
            z = torch.einsum("bhij,bjd->bihd", probs.float(), x.float())  # z_h,i = sum_j a_h,ij x_j
            if name not in stats:
                stats[name] = HeadInputStats(z.shape[2], z.shape[3], device=device)
            stats[name].update(_real_tokens(z, state["mask"]))

        return hook

    for name, module in chosen.items():
        handles.append(module.register_forward_pre_hook(hook_for(name, module)))
    modules_by_name = dict(model.named_modules())
    for name in attention:
        handles.append(modules_by_name[name].register_forward_hook(mixing_hook_for(name), with_kwargs=True))
    was_training = model.training
    previous = getattr(model.config, "_attn_implementation", None)
    if attention and previous != "eager":
        model.set_attn_implementation("eager")
    model.eval()
    try:
        for batch in batches(tokenizer, texts, batch_size, max_length, device):
            mask = batch.get("attention_mask")
            state["mask"] = None if mask is None else mask.bool()
            state["sums"] = {}
            model(**batch)
        state["sums"] = {}
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if attention and previous not in (None, "eager"):
            model.set_attn_implementation(previous)
    never = [n for n, s in stats.items() if s.count == 0]
    for n in never:  # layers the forward never reached (e.g. an unused pooler) have no statistics
        del stats[n]
    return stats

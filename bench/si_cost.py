"""Item 4. SI cost on a BERT-base-sized model (default ``BertConfig``, random weights).

* Per-head SI of every head's QK and OV form at half head dim (``core.attention_spectral_init``: thin QR of
  the factors + SVD of a k x k core per head) vs the SVD of every dense d x d head product, per layer;
  both give each head's best rank-r approximation, compared as products (relative Frobenius error).
  Target: at least 20x faster, same result to 1e-4.
* Whole model: all FFN layers at rank scale 0.5 (``FactorizedLinear.from_linear``) and all attention heads at
  half head dim, with biases; reported next to the time it takes to build the randomly initialized model.
"""

from __future__ import annotations

import torch

from fnl_transformers.core import FactorizedLinear, attention_spectral_init

from .common import attention_weights, bert_model, check_close, main, median_times, row

ITEM, QUESTION = 4, "SI cost: per-head SI vs dense SVD; whole BERT-base"


def head_factors(q, k, v, o, H):
    """Per-head (A, B) of the QK form (A_h = W_q,h^T, B_h = W_k,h^T) and the OV form (A_h = W_o,h, B_h = W_v,h^T)."""
    d = q.shape[1]
    hd = q.shape[0] // H
    qk = (q.reshape(H, hd, d).transpose(1, 2), k.reshape(H, hd, d).transpose(1, 2))
    ov = (o.reshape(o.shape[0], H, hd).permute(1, 0, 2), v.reshape(H, hd, d).transpose(1, 2))
    return {"qk": qk, "ov": ov}


def dense_si(weights, H, r):
    """Baseline: form every head's d x d product and take its truncated SVD; returns the rank-r products."""
    out = {}
    for kind, (A, B) in head_factors(*weights, H).items():
        P = A @ B.transpose(1, 2)  # H x d x d
        U, s, Vh = torch.linalg.svd(P)
        root = s[:, :r].sqrt().unsqueeze(1)
        out[kind] = (U[:, :, :r] * root) @ (Vh[:, :r].transpose(1, 2) * root).transpose(1, 2)
    return out


def per_head_si(weights, H, r):
    new = attention_spectral_init(*weights, num_heads=H, qk_rank=r, ov_rank=r)
    return new


def products_of(new, H):
    f = head_factors(new["q_weight"], new["k_weight"], new["v_weight"], new["o_weight"], H)
    return {kind: A @ B.transpose(1, 2) for kind, (A, B) in f.items()}


def run(quick: bool):
    rows = []
    model = bert_model(quick)
    build_s = model.fnl_build_seconds
    cfg = model.config
    H = cfg.num_attention_heads
    r = cfg.hidden_size // H // 2
    layer = model.encoder.layer[0]
    weights = tuple(w.detach() for w in attention_weights(layer))
    with torch.no_grad():
        t = median_times(
            {"dense": lambda: dense_si(weights, H, r), "ours": lambda: per_head_si(weights, H, r)},
            repeats=2 if quick else 3,
        )
        ref = dense_si(weights, H, r)
        got = products_of(per_head_si(weights, H, r), H)
    err = max(check_close(got[k][h], ref[k][h]) for k in ref for h in range(H))
    ratio = t["dense"] / t["ours"]
    rows.append(
        row(
            f"one layer, {H} heads x {cfg.hidden_size // H} -> {r}, QK+OV (d={cfg.hidden_size})",
            "SVD of each dense d x d head product",
            t["dense"],
            "per-head SI (QR + k x k SVD)",
            t["ours"],
            ratio,
            "baseline / ours (speed-up)",
            ">= 20x and rel. err <= 1e-4",
            bool(ratio >= 20 and err <= 1e-4),
            max_rel_err=err,
        )
    )

    def whole_model():
        with torch.no_grad():
            for lay in model.encoder.layer:
                att = lay.attention
                attention_spectral_init(
                    *attention_weights(lay),
                    num_heads=H,
                    qk_rank=r,
                    ov_rank=r,
                    q_bias=att.self.query.bias,
                    k_bias=att.self.key.bias,
                    v_bias=att.self.value.bias,
                    o_bias=att.output.dense.bias,
                )
                FactorizedLinear.from_linear(lay.intermediate.dense, rank_scale=0.5)
                FactorizedLinear.from_linear(lay.output.dense, rank_scale=0.5)

    t = median_times({"si": whole_model}, repeats=1, warmup=0)
    rows.append(
        row(
            f"whole model: {cfg.num_hidden_layers} layers, FFN rank scale 0.5, heads at half dim, biases",
            "building the random model",
            build_s,
            "SI (one run)",
            t["si"],
            t["si"] / build_s,
            "ours / baseline",
            "report",
            None,
        )
    )
    return rows


if __name__ == "__main__":
    main(ITEM, QUESTION, run)

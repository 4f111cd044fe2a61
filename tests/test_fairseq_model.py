"""fnl_transformer (fairseq plugin), in process: equivalences with fairseq's dense transformer, parameter counts,
the FD criterion's scaling, the optimizers' weight-decay groups, registration, and one clear error per bad option.

Tolerances: float32 forward passes compared with atol 1e-4 on logits of size ~3 (measured differences ~6e-6);
gradients compared with rtol/atol 1e-5 (summation order only)."""

import copy
import importlib
import os
import sys
from argparse import Namespace

import pytest
import torch

import fairseq_helpers as fh

pytest.importorskip("fairseq")

from fairseq import optim as fairseq_optim  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.modules.multihead_attention import MultiheadAttention  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

import fnl_transformers.fairseq_plugin as plugin  # noqa: E402
from fnl_transformers.core import (  # noqa: E402
    factorized_param_count,
    form_parameters,
    frobenius_penalty,
    rank_from_scale,
    tail_energy,
)
from fnl_transformers.fairseq_plugin.attention import ReducedHeadAttention  # noqa: E402

TINY_DENSE = [
    "--encoder-embed-dim",
    "32",
    "--encoder-ffn-embed-dim",
    "64",
    "--encoder-layers",
    "2",
    "--encoder-attention-heads",
    "4",
    "--decoder-embed-dim",
    "32",
    "--decoder-ffn-embed-dim",
    "64",
    "--decoder-layers",
    "2",
    "--decoder-attention-heads",
    "4",
]
FD_ALL = [
    "--criterion",
    "fd_label_smoothed_cross_entropy",
    "--fd-qk",
    "0.05",
    "--fd-ov",
    "0.05",
    "--fd-linear",
    "0.05",
    "--fd-embedding",
    "0.02",
]


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return fh.make_tiny_data(tmp_path_factory.mktemp("fairseq_data"))


def build(data_bin, *flags, arch="fnl_transformer_tiny", seed=1):
    return fh.build_model(fh.tiny_train_args(data_bin, "unused", *flags, arch=arch), seed=seed)


def batch(task, split="valid", n=8):
    task.load_dataset(split)
    ds = task.dataset(split)
    return ds.collater([ds[i] for i in range(n)])


def logits(model, sample):
    model.eval()
    with torch.no_grad():
        return model(**sample["net_input"])[0]


def beam(model, task, sample, beam_size=4):
    model.eval()
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam_size, max_len_b=20)
    with torch.no_grad():
        hyps = gen.generate([model], sample)
    return [(h[0]["tokens"].tolist(), float(h[0]["score"])) for h in hyps]


def same_hypotheses(a, b, tol=1e-4):
    return all(ta == tb and abs(sa - sb) <= tol for (ta, sa), (tb, sb) in zip(a, b)) and len(a) == len(b)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- equivalences


def test_all_options_off_is_fairseq_transformer(data_bin):
    ref, task, _ = build(data_bin, *TINY_DENSE, arch="transformer")
    ours, _, _ = build(data_bin)
    assert type(ours).__name__ == "FnlTransformerModel"
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same modules, same random numbers
    sample = batch(task)
    torch.testing.assert_close(logits(ours, sample), logits(ref, sample), rtol=0, atol=0)


@pytest.mark.parametrize(
    "flags",
    [
        ["--rank-scale", "1", "--spectral-init"],
        ["--rank-scale", "1", "--spectral-init", "--deep", "--share-all-embeddings"],
        [
            "--rank-scale",
            "1",
            "--spectral-init",
            "--share-decoder-input-output-embed",
            "--spectral-init-qk",
            "--spectral-init-ov",
        ],
    ],
)
def test_si_at_rank_scale_one_reproduces_the_dense_model(data_bin, flags):
    share = [f for f in flags if f.startswith("--share")]
    dense, task, _ = build(data_bin, *share)
    fact, _, _ = build(data_bin, *flags)  # same seed: SI factorizes the same dense initialization
    assert any(n.endswith("fc1.U") for n, _ in fact.named_parameters())
    sample = batch(task)
    torch.testing.assert_close(logits(fact, sample), logits(dense, sample), rtol=1e-4, atol=1e-4)
    assert same_hypotheses(beam(fact, task, sample), beam(dense, task, sample))


def _pad_rows(w, heads, d_from, d_to):
    """(heads*d_from) x n -> (heads*d_to) x n, zero rows appended per head."""
    out = w.new_zeros(heads, d_to, *w.shape[1:])
    out[:, :d_from] = w.reshape(heads, d_from, *w.shape[1:])
    return out.reshape(heads * d_to, *w.shape[1:])


def pad_to_dense(reduced, dense):
    """Copy ``reduced`` into the dense ``transformer`` ``dense``, zero-padding each head (what recompose does)."""
    sd = {}
    dense_sd = dense.state_dict()
    for k, v in reduced.state_dict().items():
        sd[k] = v
    for name, m in reduced.named_modules():
        if isinstance(m, ReducedHeadAttention):
            H, hd = m.num_heads, m.embed_dim // m.num_heads
            for p, d in (("q_proj", m.head_dim_qk), ("k_proj", m.head_dim_qk), ("v_proj", m.head_dim_ov)):
                sd[f"{name}.{p}.weight"] = _pad_rows(getattr(m, p).weight.detach(), H, d, hd)
                sd[f"{name}.{p}.bias"] = _pad_rows(getattr(m, p).bias.detach(), H, d, hd)
            o = m.out_proj.weight.detach()
            sd[f"{name}.out_proj.weight"] = _pad_rows(o.t(), H, m.head_dim_ov, hd).t()
    assert set(sd) == set(dense_sd)
    dense.load_state_dict(sd)
    return dense


@pytest.mark.parametrize(
    "flags",
    [
        ["--head-dim-qk", "2", "--head-dim-ov", "4", "--no-spectral-init"],  # fresh projections
        ["--head-dim-qk", "6", "--head-dim-ov", "3"],  # per-head SI (the default where heads shrink)
        ["--head-dim", "5", "--spectral-init-qk", "--no-spectral-init-ov"],
        ["--rank-scale", "0.5", "--factorize", "attention"],  # heads of 8 -> int(0.5 * 8) = 4
    ],
)
def test_reduced_heads_equal_the_zero_padded_dense_model(data_bin, flags):
    """Forward, incremental decoding, cached cross-attention keys and beam search of ReducedHeadAttention equal
    fairseq's MultiheadAttention on zero-padded heads with the original scaling."""
    red, task, _ = build(data_bin, *flags)
    assert any(isinstance(m, ReducedHeadAttention) for m in red.modules())
    dense = pad_to_dense(red, build(data_bin)[0])
    sample = batch(task)
    torch.testing.assert_close(logits(red, sample), logits(dense, sample), rtol=1e-5, atol=1e-5)
    assert same_hypotheses(beam(red, task, sample), beam(dense, task, sample))


def test_reduced_head_attention_at_full_dims_is_multihead_attention(data_bin):
    """The class's own forward (never the fused path) against fairseq's, including attention weights."""
    dense, task, _ = build(data_bin)
    ours = copy.deepcopy(dense)
    for m in ours.modules():
        if isinstance(m, MultiheadAttention):
            m.__class__ = ReducedHeadAttention
            m.head_dim_qk = m.head_dim_ov = m.head_dim
            m.skip_embed_dim_check = True
    sample = batch(task)
    dense.eval(), ours.eval()
    with torch.no_grad():
        x1, e1 = dense(**sample["net_input"])
        x2, e2 = ours(**sample["net_input"])
    torch.testing.assert_close(x2, x1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e2["attn"][0], e1["attn"][0], rtol=1e-5, atol=1e-6)
    assert same_hypotheses(beam(ours, task, sample), beam(dense, task, sample))


def test_spectral_init_of_reduced_qk_is_the_best_rank_r_approximation(data_bin):
    dense, _, _ = build(data_bin)
    red, _, _ = build(data_bin, "--head-dim-qk", "3", "--spectral-init-qk")
    H, hd, r = 4, 8, 3
    for name in ("encoder.layers.0.self_attn", "decoder.layers.1.encoder_attn"):
        a, b = dense.get_submodule(name), red.get_submodule(name)
        for h in range(H):
            # QK form of head h acting on [x, 1]: [W_q,h | b_q,h]^T W_k,h (the key bias is softmax-invariant)
            qa = torch.cat([a.q_proj.weight, a.q_proj.bias[:, None]], 1)[h * hd : (h + 1) * hd]
            qb = torch.cat([b.q_proj.weight, b.q_proj.bias[:, None]], 1)[h * r : (h + 1) * r]
            full = qa.t() @ a.k_proj.weight[h * hd : (h + 1) * hd]
            approx = qb.t() @ b.k_proj.weight[h * r : (h + 1) * r]
            err = float((full - approx).double().norm())
            assert err == pytest.approx(tail_energy(full, r), rel=1e-4, abs=1e-6)  # Eckart-Young


# ---------------------------------------------------------------------------------------------- parameter counts


def test_parameter_counts_match_the_formula(data_bin):
    dense, task, _ = build(data_bin)
    base = n_params(dense)
    d, ffn, V, H, layers = 32, 64, len(task.target_dictionary), 4, 4
    assert base == n_params(build(data_bin, *TINY_DENSE, arch="transformer")[0])

    def ffn_delta(R, deep):
        r = rank_from_scale(ffn, d, R)
        return layers * 2 * (factorized_param_count(ffn, d, r, deep) - ffn * d)

    def emb_delta(R, deep, tables):
        r = rank_from_scale(V, d, R)
        return tables * (factorized_param_count(V, d, r, deep) - V * d)

    # untied: encoder table, decoder table, decoder output projection (all V x d)
    untied = n_params(build(data_bin, "--rank-scale", "0.5")[0])
    assert untied == base + ffn_delta(0.5, False) + emb_delta(0.5, False, 3)
    # hand-worked: r = 16 for every 32 x 64 FFN layer and 32 x 56 table
    assert ffn_delta(0.5, False) == 8 * (16 * (64 + 32) - 64 * 32)
    shared, _, _ = build(data_bin, "--share-all-embeddings")
    s_base = n_params(shared)
    assert n_params(build(data_bin, "--share-all-embeddings", "--rank-scale", "0.5")[0]) == s_base + ffn_delta(
        0.5, False
    ) + emb_delta(0.5, False, 1)
    assert n_params(build(data_bin, "--rank-scale", "1.5", "--deep", "--factorize", "ffn")[0]) == base + ffn_delta(
        1.5, True
    )
    # reduced heads: q, k: H*dq x (d + 1) each, v: H*dv x (d + 1), out: d x H*dv + d; 6 attention modules
    dq, dv, n_attn = 2, 5, 6
    per_attn = 2 * H * dq * (d + 1) + H * dv * (d + 1) + d * H * dv + d
    assert n_params(build(data_bin, "--head-dim-qk", str(dq), "--head-dim-ov", str(dv))[0]) == base + n_attn * (
        per_attn - 4 * (d * d + d)
    )


# ---------------------------------------------------------------------------------------------- FD criterion


def test_per_module_ranks_and_parameter_budget(data_bin):
    """--ranks (first matching pattern wins over --rank-scale) and --target-param-ratio (core plan_ranks)."""
    model, _, _ = build(data_bin, "--rank-scale", "0.5", "--ranks", "encoder.layers.0.fc1=3,*.fc1=5")
    assert model.encoder.layers[0].fc1.rank == 3 and model.decoder.layers[1].fc1.rank == 5
    assert model.encoder.layers[0].fc2.rank == rank_from_scale(32, 64, 0.5)
    dense = n_params(build(data_bin)[0])
    small = n_params(build(data_bin, "--target-param-ratio", "0.8", "--head-dim", "4")[0])
    assert 0.7 * dense < small <= 0.8 * dense


def _criterion(task, args):
    return task.build_criterion(convert_namespace_to_omegaconf(args).criterion)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fd_penalty_counts_once_per_update_whatever_the_split(data_bin):
    """Two micro-batches (update-freq 2, or two workers) give the gradient of one batch twice the size, and its
    FD part is exactly the gradient of the penalty, counted once."""
    model, task, args = build(data_bin, "--rank-scale", "0.5", "--spectral-init", *FD_ALL)
    plain_args = copy.copy(args)
    plain_args.criterion = "label_smoothed_cross_entropy"
    crit, plain = _criterion(task, args), _criterion(task, plain_args)
    task.load_dataset("train")
    ds = task.dataset("train")
    halves = [ds.collater([ds[i] for i in range(0, 6)]), ds.collater([ds[i] for i in range(6, 16)])]
    whole = ds.collater([ds[i] for i in range(16)])
    model.train()

    def grad_of(criterion, samples):
        model.zero_grad()
        total = 0
        for s in samples:
            loss, sample_size, _ = criterion(model, s)
            loss.backward()
            total += sample_size
        return {k: g / total for k, g in _grads(model).items()}  # fairseq: summed gradient / total sample size

    split, one = grad_of(crit, halves), grad_of(crit, [whole])
    ce_only = grad_of(plain, halves)
    model.zero_grad()
    frobenius_penalty(model, linear=0.05, embedding=0.02, qk=0.05, ov=0.05).backward()
    penalty = _grads(model)
    assert set(split) == set(one)
    for k in split:
        torch.testing.assert_close(split[k], one[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            split[k] - ce_only[k], penalty.get(k, torch.zeros_like(split[k])), rtol=1e-4, atol=1e-6
        )
    assert any(penalty[k].abs().max() > 1e-3 for k in penalty)  # FD actually matters here


def test_fd_is_skipped_in_validation_and_logged_per_kind(data_bin):
    model, task, args = build(data_bin, "--rank-scale", "0.5", *FD_ALL)
    plain_args = copy.copy(args)
    plain_args.criterion = "label_smoothed_cross_entropy"
    crit, plain = _criterion(task, args), _criterion(task, plain_args)
    sample = batch(task)
    model.eval()
    with torch.no_grad():
        assert torch.equal(crit(model, sample)[0], plain(model, sample)[0])
    model.train()
    loss, size, log = crit(model, sample)
    penalty = frobenius_penalty(model, linear=0.05, embedding=0.02, qk=0.05, ov=0.05)
    torch.testing.assert_close(loss, plain(model, sample)[0] + penalty * size, rtol=1e-6, atol=1e-4)
    assert {k for k in log if k.startswith("fd_")} == {"fd_linear", "fd_embedding", "fd_qk", "fd_ov"}
    torch.testing.assert_close(sum(log[f"fd_{k}"] for k in ("linear", "embedding", "qk", "ov")), penalty * size)


def test_fd_without_forms_is_one_clear_error(data_bin):
    with pytest.raises(ValueError, match=r"--fd-linear > 0 but the model has no embedding/linear forms to decay"):
        build(data_bin, "--criterion", "fd_label_smoothed_cross_entropy", "--fd-linear", "0.1")
    # --fd-linear decays factorized FFN layers and embeddings: FFN alone is enough
    model, task, args = build(
        data_bin,
        "--rank-scale",
        "0.5",
        "--factorize",
        "ffn",
        "--criterion",
        "fd_label_smoothed_cross_entropy",
        "--fd-linear",
        "0.1",
    )
    model.train()
    _, _, log = _criterion(task, args)(model, batch(task))
    assert "fd_linear" in log and "fd_embedding" not in log


def test_fd_criterion_reads_the_models_fd_spec(data_bin):
    """One FD spec, held by the model: the criterion on a stock model is refused; decoupled FD adds nothing to
    the loss."""
    model, task, args = build(
        data_bin, *TINY_DENSE, "--criterion", "fd_label_smoothed_cross_entropy", arch="transformer"
    )
    model.train()
    with pytest.raises(ValueError, match="reads its FD coefficients from the model"):
        _criterion(task, args)(model, batch(task))
    model, task, args = build(
        data_bin,
        "--criterion",
        "fd_label_smoothed_cross_entropy",
        "--fd-qk",
        "0.5",
        "--fd-mode",
        "decoupled",
        "--optimizer",
        "flambe",
    )
    assert model.fnl_fd.qk == 0.5 and model.fnl_fd.mode == "decoupled"
    plain_args = copy.copy(args)
    plain_args.criterion = "label_smoothed_cross_entropy"
    model.train()
    sample = batch(task)
    loss, _, log = _criterion(task, args)(model, sample)
    assert torch.equal(loss, _criterion(task, plain_args)(model, sample)[0])
    assert not any(k.startswith("fd_") for k in log)


# ---------------------------------------------------------------------------------------------- optimizers


def _optimizer(args, model):
    cfg = convert_namespace_to_omegaconf(args)
    return fairseq_optim.build_optimizer(cfg.optimizer, list(model.parameters()))


def _decay_of_groups(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in opt.param_groups:
        decay = "fd" if g.get("fd_forms") else ("weight_decay" if g["weight_decay"] > 0 else "none")
        out.update({names[id(p)]: decay for p in g["params"]})
    return out


def test_fnl_adam_keeps_fd_factors_out_of_weight_decay(data_bin):
    lr, wd = 0.005, 0.1
    model, task, args = build(
        data_bin,
        "--rank-scale",
        "0.5",
        "--criterion",
        "fd_label_smoothed_cross_entropy",
        "--fd-qk",
        "0.01",
        "--fd-linear",
        "0.01",
        "--fd-embedding",
        "0",
        "--optimizer",
        "fnl_adam",
        "--weight-decay",
        str(wd),
    )
    opt = _optimizer(args, model)
    fd = {n for n, _, kind in form_parameters(model, ["qk", "linear"])}
    assert fd and all(n.endswith(("q_proj.weight", "k_proj.weight", "fc1.U", "fc1.V", "fc2.U", "fc2.V")) for n in fd)
    decay = _decay_of_groups(opt, model)
    no_wd = {n for n, d in decay.items() if d == "none"}
    assert no_wd == fd  # embeddings (FD 0 here), v/out_proj, biases, norms keep weight decay
    assert decay["encoder.embed_tokens.U"] == "weight_decay"  # a factor without FD: --weight-decay-factors
    # behaviour: with zero gradients Adam's step is the decay alone
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expect = before[n] if n in fd else before[n] * (1 - lr * wd)
        # fairseq's Adam computes w + (-lr wd) w, this w (1 - lr wd): the same value rounded differently, up to
        # 1 ulp (1.2e-7 relative; measured 3e-8 absolute); rtol 1e-6 is ~8 ulps and 500x below the decay lr wd
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=0)


def test_no_weight_decay_factors_and_no_decay_bias_norm(data_bin):
    model, _, args = build(
        data_bin,
        "--rank-scale",
        "0.5",
        "--optimizer",
        "fnl_adam",
        "--weight-decay",
        "0.1",
        "--no-weight-decay-factors",
        "--no-decay-bias-norm",
    )
    decay = _decay_of_groups(_optimizer(args, model), model)
    factors = {n for n, _, _ in form_parameters(model)}
    assert {n for n, d in decay.items() if d == "weight_decay"} == {
        n for n, _ in model.named_parameters() if n not in factors and not n.endswith("bias") and "layer_norm" not in n
    }
    assert all(decay[n] == "none" for n in factors)


def test_stock_optimizer_with_weight_decay_and_fd_is_refused(data_bin):
    with pytest.raises(ValueError, match=r"--fd-qk replaces weight decay .* Use --optimizer fnl_adam"):
        build(
            data_bin, "--criterion", "fd_label_smoothed_cross_entropy", "--fd-qk", "0.01", "--weight-decay", "0.01"
        )  # --optimizer adam from tiny_train_args
    with pytest.raises(ValueError, match=r"--no-weight-decay-factors keeps the factors out of weight decay"):
        build(data_bin, "--rank-scale", "0.5", "--no-weight-decay-factors", "--weight-decay", "0.01")
    build(data_bin, "--criterion", "fd_label_smoothed_cross_entropy", "--fd-qk", "0.01")  # no decay: fine


def test_inconsistent_fd_setups_are_refused_at_build(data_bin):
    with pytest.raises(
        ValueError,
        match=r"--fd-qk with --fd-mode coupled adds Frobenius decay to the loss, which "
        r"--criterion label_smoothed_cross_entropy does not do",
    ):
        build(data_bin, "--fd-qk", "0.01")
    with pytest.raises(
        ValueError,
        match=r"--fd-mode decoupled applies Frobenius decay in the optimizer, which "
        r"--optimizer fnl_adam does not do: use --optimizer flambe",
    ):
        build(data_bin, "--fd-qk", "0.01", "--fd-mode", "decoupled", "--optimizer", "fnl_adam")


def test_flambe_groups_decoupled_fd_from_the_models_records(data_bin):
    model, task, args = build(
        data_bin,
        "--rank-scale",
        "0.5",
        "--optimizer",
        "flambe",
        "--fd-ov",
        "0.01",
        "--fd-mode",
        "decoupled",
        "--weight-decay",
        "0.01",
        "--no-decay-bias-norm",
    )
    opt = _optimizer(args, model)
    names = {id(p): n for n, p in model.named_parameters()}
    fd_groups = [g for g in opt.param_groups if g.get("fd_forms")]
    assert len(fd_groups) == 1 and fd_groups[0]["fd"] == {"ov": 0.01} and fd_groups[0]["weight_decay"] == 0
    assert {names[id(p)] for p in fd_groups[0]["params"]} == {n for n, _, _ in form_parameters(model, ["ov"])}
    assert len(fd_groups[0]["fd_forms"]) == len(list(m for m in model.modules() if isinstance(m, MultiheadAttention)))
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and not any(n.endswith("bias") or "layer_norm" in n for n in decayed)
    assert type(opt.optimizer).__name__ == "FLAMBe"
    # the optimizer's decoupled FD term is the core's FD gradient of the forms rebuilt from the records
    from fnl_transformers.core import fd_grads
    from fnl_transformers.optim._fd import fd_terms

    terms = fd_terms(fd_groups[0])
    expected = fd_grads(model, ov=0.01)
    assert {names[i] for i in terms} == set(expected)
    for i, g in terms.items():
        torch.testing.assert_close(g, expected[names[i]], rtol=1e-6, atol=1e-9)
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()
    opt.step()  # runs the decoupled-FD update

    model, _, args = build(data_bin, "--optimizer", "fnl_lamb", "--weight-decay", "0.01")
    opt = _optimizer(args, model)
    assert type(opt.optimizer).__name__ == "Lamb"
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_decoupled_fd_groups_survive_fp32_master_copies(data_bin):
    """fairseq's FP16Optimizer with --fp16-no-flatten-grads hands the optimizer fp32 copies that carry
    ``optim_overrides``: the groups (and the FD forms) are rebuilt from those copies."""
    from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin

    model, _, args = build(
        data_bin,
        "--rank-scale",
        "0.5",
        "--optimizer",
        "flambe",
        "--fd-ov",
        "0.01",
        "--fd-linear",
        "0.01",
        "--fd-mode",
        "decoupled",
        "--weight-decay",
        "0.01",
    )
    args.fp16_no_flatten_grads = True
    copies = _FP16OptimizerMixin.build_fp32_params(args, list(model.parameters()), flatten=False)
    opt = fairseq_optim.build_optimizer(convert_namespace_to_omegaconf(args).optimizer, copies)
    ref = _optimizer(args, model)
    index = {id(c): i for i, c in enumerate(copies)}
    order = {id(p): i for i, p in enumerate(model.parameters())}
    got = [
        ([index[id(p)] for p in g["params"]], g["weight_decay"], g.get("fd"), g.get("fd_forms"))
        for g in opt.param_groups
    ]
    want = [
        ([order[id(p)] for p in g["params"]], g["weight_decay"], g.get("fd"), g.get("fd_forms"))
        for g in ref.param_groups
    ]
    assert got == want and got[0][3]


def test_plugin_optimizers_on_a_stock_model_decay_everything(data_bin):
    model, _, args = build(
        data_bin, *TINY_DENSE, "--optimizer", "fnl_adam", "--weight-decay", "0.01", arch="transformer"
    )
    opt = _optimizer(args, model)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.01


# ---------------------------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--head-dim", "12"],
            r"--head-dim-qk 12 does not fit encoder\.layers\.0\.self_attn: its heads have dimension 8",
        ),
        (["--head-dim-ov", "0"], r"--head-dim-ov must be a positive integer \(>= 1\), got 0"),
        (["--rank-scale", "0"], r"--rank-scale must be a finite number > 0"),
        (["--deep"], r"--deep needs --rank-scale, --ranks or --target-param-ratio"),
        (
            ["--rank-scale", "0.5", "--factorize", "ffn,embeddings"],
            r"--factorize: unknown part\(s\) \['embeddings'\]; .*\('embeddings' is now spelled 'embedding'",
        ),
        (
            ["--rank-scale", "1.5", "--factorize", "attention"],
            r"the QK head dim 12 \(from --rank-scale 1.5 with 'attention' in --factorize\) does not fit",
        ),
        (
            ["--rank-scale", "0.5", "--target-param-ratio", "0.5"],
            r"give --rank-scale or --target-param-ratio, not both",
        ),
        (["--ranks", "*.fc9=3"], r"--ranks: pattern\(s\) \['\*\.fc9'\] match no layer"),
        (["--ranks", "fc1"], r"--ranks must be PATTERN=RANK pairs"),
        (
            ["--rank-scale", "0.5", "--activation-aware"],
            r"--activation-aware truncates pretrained weights .* trained from "
            r"scratch: drop it",
        ),
        (["--rank-scale", "0.5", "--damping", "0.1"], r"--damping applies to activation-aware truncation only"),
        (["--criterion", "fd_label_smoothed_cross_entropy", "--fd-qk", "-1"], r"--fd-qk must be a finite number >= 0"),
    ],
)
def test_bad_options_give_one_clear_error(data_bin, flags, message):
    with pytest.raises(ValueError, match=message):
        model, task, args = build(data_bin, *flags)
        _criterion(task, args)


def test_checkpoint_of_another_configuration_is_one_clear_error(data_bin):
    small, _, _ = build(data_bin, "--rank-scale", "0.25")
    other, _, _ = build(data_bin, "--rank-scale", "0.5")
    with pytest.raises(ValueError, match=r"does not match this fnl_transformer configuration .*--rank-scale"):
        other.load_state_dict(small.state_dict())


# ---------------------------------------------------------------------------------------------- registration


def test_registration_is_idempotent_and_the_user_dir_imports_under_its_own_name():
    from fairseq import utils
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.optim import OPTIMIZER_REGISTRY

    plugin.register()
    importlib.reload(plugin)  # a second execution of the module registers nothing twice
    path = fh.user_dir()
    assert os.path.basename(path) == "fnl_fairseq_plugin" and os.path.isfile(os.path.join(path, "__init__.py"))
    utils.import_user_module(Namespace(user_dir=path))
    utils.import_user_module(Namespace(user_dir=path))
    assert "fnl_fairseq_plugin" in sys.modules
    assert MODEL_REGISTRY["fnl_transformer"].__name__ == "FnlTransformerModel"
    assert {
        "fnl_transformer",
        "fnl_transformer_small",
        "fnl_transformer_iwslt_de_en",
        "fnl_transformer_wmt_en_de",
        "fnl_transformer_tiny",
    } <= set(ARCH_MODEL_REGISTRY)
    assert "fd_label_smoothed_cross_entropy" in CRITERION_REGISTRY
    assert {"fnl_adam", "flambe", "fnl_lamb"} <= set(OPTIMIZER_REGISTRY)


def test_architectures_have_the_dims_of_fairseqs():
    from fairseq.models import ARCH_CONFIG_REGISTRY

    for ours, theirs in (
        ("fnl_transformer_iwslt_de_en", "transformer_iwslt_de_en"),
        ("fnl_transformer_wmt_en_de", "transformer_wmt_en_de"),
        ("fnl_transformer", "transformer"),
    ):
        a, b = Namespace(), Namespace()
        ARCH_CONFIG_REGISTRY[ours](a)
        ARCH_CONFIG_REGISTRY[theirs](b)
        assert {k: v for k, v in vars(a).items() if k in vars(b)} == vars(b)
        assert a.rank_scale is None and a.head_dim is None and a.deep is None  # None: the core default applies


@pytest.mark.slow
def test_userdir_command_prints_the_shim_from_any_directory():
    import subprocess

    res = subprocess.run(
        [sys.executable, "-m", "fnl_transformers.cli", "userdir"], capture_output=True, text=True, cwd="/"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == fh.user_dir()

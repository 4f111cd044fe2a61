"""FNLTrainer: coupled FD once per update, no weight decay on factors, decoupled FD (FLAMBe / AdamWFD),
gradient accumulation equal to a larger batch, resume equal to an uninterrupted run, NaN/Inf guard.

Tiny models (BERT MLM, hidden 32, 2 layers), 3-6 updates each. Tolerances: parameters are compared by
max |difference| relative to how far the reference moved (``max_rel_diff``); identical arithmetic in another
order gives ~1e-6, a missing or doubled FD term or a wrongly scaled loss gives > 1e-2.
"""
import os

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer  # noqa: E402

from fnl_transformers.core import NonFiniteError, form_diagnostics, form_parameters, frobenius_penalty  # noqa: E402
from fnl_transformers.hf.trainer import FNLTrainer  # noqa: E402

from hf_trainer_helpers import FD, MLMData, max_rel_diff, params, quiet, tiny_bert, training_args  # noqa: E402

quiet()
TOL = 1e-4  # relative to the reference's movement (see module docstring)


def _trainer(tmp_path, model, data, cls=FNLTrainer, name="run", trainer_kw=None, **args_kw):
    args = training_args(str(tmp_path / name), **args_kw)
    kw = dict(fnl_config=FD) if cls is FNLTrainer else {}
    kw.update(trainer_kw or {})
    return cls(model=model, args=args, train_dataset=data, **kw)


def _manual_adamw(model, data, steps, batch, lr, wd, fd):
    """Reference loop: sequential batches, loss = MLM mean + FD (Eq. 3), torch AdamW; weight decay on
    every weight except biases, LayerNorms and factors."""
    factors = {id(p) for _, p, _ in form_parameters(model)}
    decay, no = [], []
    for n, p in model.named_parameters():
        no_wd = "bias" in n or "LayerNorm" in n or id(p) in factors
        (no if no_wd else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no, "weight_decay": 0.0}], lr=lr)
    model.train()
    for s in range(steps):
        items = [data[i] for i in range(s * batch, (s + 1) * batch)]
        inputs = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        loss = model(**inputs).loss + frobenius_penalty(model, **fd)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return params(model)


def test_coupled_fd_equals_manual_loop_and_factors_get_no_weight_decay(tmp_path):
    data = MLMData()
    model = tiny_bert()
    start = params(model)
    trainer = _trainer(tmp_path, model, data, train_sampling_strategy="sequential", optim="adamw_torch")
    trainer.train()
    got = params(model)

    # Trainer's optimizer: no factor in a group with weight decay, other weights decayed
    factors = {id(p) for _, p, _ in form_parameters(model)}
    assert len(factors) == 2 * 2 * 2 + 2 * 4  # 2 layers x (2 FFN x (U, V) + q, k, v, o)
    for g in trainer.optimizer.param_groups:
        if g["weight_decay"] > 0:
            assert not factors & {id(p) for p in g["params"]}
            assert any(p is model.bert.embeddings.word_embeddings.weight for p in g["params"])

    ref = tiny_bert()
    want = _manual_adamw(ref, data, steps=3, batch=4, lr=1e-2, wd=0.1, fd=FD)
    assert max_rel_diff(got, want, start) < TOL
    # the check can fail: the same loop without FD ends elsewhere
    no_fd = _manual_adamw(tiny_bert(), data, steps=3, batch=4, lr=1e-2, wd=0.1, fd={})
    assert max_rel_diff(no_fd, want, start) > 100 * TOL


def test_diagnostics_are_logged(tmp_path):
    model = tiny_bert()
    trainer = _trainer(tmp_path, model, MLMData(), max_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    last = logs[-1]
    diag = form_diagnostics(model, lr=last["learning_rate"])  # logged after the last update: same model
    for k, v in diag.items():
        assert last[f"fnl/{k}"] == pytest.approx(v, rel=1e-6)
    for kind in ("linear", "qk", "ov"):
        assert f"fnl/{kind}/eff_step" in last and f"fnl/{kind}/fd" in last
    fd_total = sum(last[f"fnl/{kind}/fd"] for kind in FD)
    assert fd_total == pytest.approx(float(frobenius_penalty(model, **FD).detach()), rel=1e-6)


@pytest.mark.parametrize("fd", ["coupled", "decoupled"])
def test_gradient_accumulation_equals_twice_the_batch(tmp_path, fd):
    """GA=2 x batch 2 vs GA=1 x batch 4, random order (same seed), SGD so a scale error shows 1:1;
    label counts differ between micro-batches, so only token-weighted normalization matches."""
    data = MLMData()
    kw = dict(max_steps=3, optim="sgd", learning_rate=0.5, trainer_kw=dict(fd=fd))
    if fd == "decoupled":
        # AdamWFD (Trainer's optim is not used); eps 1e-6 keeps Adam from amplifying rounding in near-zero
        # gradients (eps 1e-8: 2e-4). A per-micro-batch mean instead of token weighting gives 1.7 here.
        kw.update(learning_rate=1e-2, adam_epsilon=1e-6)
    big_model = tiny_bert()
    start = params(big_model)
    _trainer(tmp_path, big_model, data, name="big", per_device_train_batch_size=4, **kw).train()
    ga_model = tiny_bert()
    _trainer(tmp_path, ga_model, data, name="ga", per_device_train_batch_size=2, gradient_accumulation_steps=2,
             **kw).train()
    assert max_rel_diff(params(ga_model), params(big_model), start) < TOL


def test_plain_trainer_ga_is_off_for_mean_loss_models(tmp_path):
    """Why FNLTrainer rescales: a plain Trainer on BERT MLM (a per-micro-batch mean that ignores
    num_items_in_batch) with GA=2 does not equal the larger batch. If this starts failing, transformers fixed
    it, and FNLTrainer's rescaling is still exact (test above)."""
    data = MLMData()
    kw = dict(max_steps=3, optim="sgd", learning_rate=0.5)
    big = tiny_bert()
    start = params(big)
    _trainer(tmp_path, big, data, cls=Trainer, name="big", per_device_train_batch_size=4, **kw).train()
    ga = tiny_bert()
    _trainer(tmp_path, ga, data, cls=Trainer, name="ga", per_device_train_batch_size=2,
             gradient_accumulation_steps=2, **kw).train()
    assert max_rel_diff(params(ga), params(big), start) > 100 * TOL


def test_micro_batch_without_labels_counts_zero(tmp_path):
    model = tiny_bert()
    trainer = _trainer(tmp_path, model, MLMData())
    batch = {k: torch.stack([MLMData(4)[i][k] for i in range(2)]) for k in ("input_ids", "attention_mask")}
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(5))
    fd = float(frobenius_penalty(model, **FD).detach()) / 2
    assert float(loss.detach()) == pytest.approx(fd, rel=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_nan_factor_is_reported_with_its_layer(tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.U[0, 0] = float("nan")
    trainer = _trainer(tmp_path, model, MLMData())
    with pytest.raises(NonFiniteError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense\.U.*NaN"):
        trainer.train()


def test_fd_overflow_is_reported_with_its_layer(tmp_path):
    model = tiny_bert()
    with torch.no_grad():  # finite factors whose product's squared norm overflows float32
        model.bert.encoder.layer[0].attention.output.dense.weight.mul_(1e12)
        model.bert.encoder.layer[0].attention.self.value.weight.mul_(1e12)
    trainer = _trainer(tmp_path, model, MLMData(), max_steps=1)
    with pytest.raises(NonFiniteError, match=r"'ov' form of layer 'bert\.encoder\.layer\.0\.attention' overflows"):
        trainer.train()


def test_bad_arguments_fail_clearly(tmp_path):
    data = MLMData(4)
    with pytest.raises(ValueError, match="fd must be one of"):
        _trainer(tmp_path, tiny_bert(), data, trainer_kw=dict(fd="sometimes"))
    with pytest.raises(ValueError, match="fd_optimizer must be one of"):
        _trainer(tmp_path, tiny_bert(), data, trainer_kw=dict(fd_optimizer="sgd"))
    with pytest.raises(ValueError, match="FD coefficient for 'qk'"):
        _trainer(tmp_path, tiny_bert(), data, trainer_kw=dict(fnl_config={"qk": -1.0}))
    with pytest.raises(ValueError, match="unknown kinds"):
        _trainer(tmp_path, tiny_bert(), data, trainer_kw=dict(fnl_config={"attention": 1.0}))
    with pytest.raises(ValueError, match="no forms of those kinds"):
        _trainer(tmp_path, tiny_bert(), data, trainer_kw=dict(fnl_config={"embedding": 1e-3}))
    from transformers import BertConfig, BertForMaskedLM

    plain = BertForMaskedLM(BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=8))
    with pytest.raises(ValueError, match="patch_model"):
        FNLTrainer(model=plain, args=training_args(str(tmp_path / "x")), train_dataset=data)

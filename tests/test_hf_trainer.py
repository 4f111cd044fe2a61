"""FNLTrainer: coupled FD once per update, no weight decay on factors, decoupled FD (FLAMBe / AdamWFD),
gradient accumulation equal to a larger batch, resume equal to an uninterrupted run, NaN/Inf guard.

Tiny models (BERT MLM, hidden 32, 2 layers), 3-6 updates each. Tolerances: parameters are compared by
max |difference| relative to how far the reference moved (``max_rel_diff``); identical arithmetic in another
order gives ~4e-7 with SGD and up to 1.4e-5 with AdamWFD (Adam divides rounding differences in small gradients
by their own size), a missing or doubled FD term or a wrongly scaled loss gives > 1e-2.
"""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer  # noqa: E402

from fnl_transformers.core import NonFiniteError, form_diagnostics, form_parameters, frobenius_penalty  # noqa: E402
from fnl_transformers.hf import guard  # noqa: E402
from fnl_transformers.hf.trainer import FNLTrainer  # noqa: E402

from hf_trainer_helpers import FD, MLMData, max_rel_diff, params, quiet, tiny_bert, tiny_gpt2, training_args  # noqa: E402

quiet()
TOL = 1e-3  # relative to the reference's movement, arithmetic in another order: 70x above 1.4e-5, 10x below 1e-2
EXACT = 1e-6  # same batches, same operations in the same order (measured: bitwise equal)


def _trainer(tmp_path, model, data, cls=FNLTrainer, name="run", trainer_kw=None, **args_kw):
    args = training_args(str(tmp_path / name), **args_kw)
    return cls(model=model, args=args, train_dataset=data, **(trainer_kw or {}))


def _manual_adamw(model, data, steps, batch, lr, wd, fd):
    """Reference loop: sequential batches, loss = MLM mean + FD (Definition 3.2), torch AdamW; weight decay on
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
    assert max_rel_diff(got, want, start) < EXACT
    # the check can fail: the same loop without FD ends elsewhere
    no_fd = _manual_adamw(tiny_bert(), data, steps=3, batch=4, lr=1e-2, wd=0.1, fd={})
    assert max_rel_diff(no_fd, want, start) > 100 * EXACT


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


@pytest.mark.parametrize("arch,fd", [("bert", "coupled"), ("bert", "decoupled"), ("gpt2", "coupled")])
def test_gradient_accumulation_equals_twice_the_batch(tmp_path, arch, fd):
    """GA=2 x batch 2 vs GA=1 x batch 4, random order (same seed), SGD so a scale error shows 1:1;
    label counts differ between micro-batches, so only token-weighted normalization matches. BERT's MLM loss
    ignores num_items_in_batch (FNLTrainer reweights its mean); GPT-2's reads it (used as is)."""
    build = {"bert": tiny_bert, "gpt2": tiny_gpt2}[arch]
    data = MLMData()
    kw = dict(max_steps=3, optim="sgd", learning_rate=0.5, trainer_kw=dict(fd=fd))
    if fd == "decoupled":
        # AdamWFD (Trainer's optim is not used); eps 1e-6 keeps Adam from amplifying rounding in near-zero
        # gradients (eps 1e-8: 2e-4). A per-micro-batch mean instead of token weighting gives 1.7 here.
        kw.update(learning_rate=1e-2, adam_epsilon=1e-6)
    big_model = build()
    start = params(big_model)
    _trainer(tmp_path, big_model, data, name="big", per_device_train_batch_size=4, **kw).train()
    ga_model = build()
    _trainer(
        tmp_path, ga_model, data, name="ga", per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw
    ).train()
    assert max_rel_diff(params(ga_model), params(big_model), start) < TOL
    assert not any("_loss_function" in vars(m) for m in ga_model.modules())  # the loss spy left no trace


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
    _trainer(
        tmp_path, ga, data, cls=Trainer, name="ga", per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw
    ).train()
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
    with pytest.raises(ValueError, match="fd_embedding > 0 but the model has no embedding forms to decay"):
        _trainer(tmp_path, tiny_bert(), data, trainer_kw=dict(fnl_config={"embedding": 1e-3}))
    from transformers import BertConfig, BertForMaskedLM

    plain = BertForMaskedLM(
        BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    with pytest.raises(ValueError, match="patch_model"):
        FNLTrainer(model=plain, args=training_args(str(tmp_path / "x")), train_dataset=data)


def _manual_flambe(model, data, steps, batch, lr, wd, eps):
    from fnl_transformers.optim import FLAMBe, param_groups

    opt = FLAMBe(param_groups(model, **{f"fd_{k}": v for k, v in FD.items()}, weight_decay=wd), lr=lr, eps=eps)
    model.train()
    for s in range(steps):
        items = [data[i] for i in range(s * batch, (s + 1) * batch)]
        model(**{k: torch.stack([it[k] for it in items]) for k in items[0]}).loss.backward()
        opt.step()
        opt.zero_grad()
    return params(model)


def test_flambe_fnl_trainer_and_plain_trainer_equal_manual_loop(tmp_path):
    """FD decoupled through FLAMBe, two ways: FNLTrainer(fd_optimizer="flambe") on a model patched with
    FNLConfig(fd_mode="decoupled"), and a plain Trainer given optimizers=(FLAMBe(param_groups(...)), None);
    both equal a hand-written FLAMBe loop."""
    from fnl_transformers.optim import FLAMBe, param_groups

    data = MLMData()
    kw = dict(train_sampling_strategy="sequential", learning_rate=1e-2, adam_epsilon=1e-6)
    start = params(tiny_bert())
    want = _manual_flambe(tiny_bert(), data, steps=3, batch=4, lr=1e-2, wd=0.1, eps=1e-6)

    model = tiny_bert(fd_mode="decoupled")
    trainer = _trainer(tmp_path, model, data, name="fnl", trainer_kw=dict(fd_optimizer="flambe"), **kw)
    trainer.train()
    assert isinstance(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, FLAMBe
    )
    assert max_rel_diff(params(model), want, start) < EXACT

    plain = tiny_bert()
    opt = FLAMBe(param_groups(plain, **{f"fd_{k}": v for k, v in FD.items()}, weight_decay=0.1), lr=1e-2, eps=1e-6)
    _trainer(tmp_path, plain, data, cls=Trainer, name="plain", trainer_kw=dict(optimizers=(opt, None)), **kw).train()
    assert max_rel_diff(params(plain), want, start) < EXACT
    # FD matters at this tolerance: FLAMBe without FD (Lamb with weight decay on the factors) ends elsewhere
    from fnl_transformers.optim import Lamb

    lamb = tiny_bert()
    opt = Lamb(param_groups(lamb, weight_decay=0.1), lr=1e-2, eps=1e-6)
    _trainer(tmp_path, lamb, data, cls=Trainer, name="lamb", trainer_kw=dict(optimizers=(opt, None)), **kw).train()
    assert max_rel_diff(params(lamb), want, start) > 100 * EXACT  # measured 2e-3


def test_coupled_fd_with_an_fd_optimizer_is_refused(tmp_path):
    from fnl_transformers.optim import FLAMBe, param_groups

    model = tiny_bert()
    opt = FLAMBe(param_groups(model, fd_qk=1e-3), lr=1e-3)
    with pytest.raises(ValueError, match="FD would count twice"):
        _trainer(tmp_path, model, MLMData(4), trainer_kw=dict(optimizers=(opt, None)))
    _trainer(tmp_path, model, MLMData(4), trainer_kw=dict(optimizers=(opt, None), fd="decoupled"))  # fine


@pytest.mark.parametrize("fd,dropout", [("coupled", 0.1), ("decoupled", 0.0)])
def test_resume_from_mid_run_checkpoint_equals_uninterrupted(tmp_path, fd, dropout):
    """6 updates, checkpoint after 3; a fresh trainer resumed from it reaches the same parameters and
    losses (random order, and dropout in the coupled case: data order and RNG state must be restored;
    the FLAMBe state and FD groups reload through torch.load(weights_only=True))."""
    data = MLMData()
    kw = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        per_device_train_batch_size=2,
        trainer_kw=dict(fd=fd, fd_optimizer="flambe"),
        learning_rate=1e-2,
    )
    full = tiny_bert(dropout=dropout)
    start = params(full)
    t_full = _trainer(tmp_path, full, data, name="full", **kw)
    t_full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "rng_state.pth").is_file()
    assert guard.is_marked(ckpt)  # the patched model's save_pretrained marks every checkpoint
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # safe loading, no allow-list needed

    resumed = tiny_bert(dropout=dropout, seed=123)  # different init: everything must come from the checkpoint
    t_res = _trainer(tmp_path, resumed, data, name="resumed", **kw)
    t_res.train(resume_from_checkpoint=str(ckpt))
    assert max_rel_diff(params(resumed), params(full), start) < TOL
    losses = lambda t: {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}  # noqa: E731
    full_losses, res_losses = losses(t_full), losses(t_res)
    assert sorted(res_losses) == [1, 2, 3, 4, 5, 6]  # 1-3 come from the checkpoint's trainer_state.json
    for step in (4, 5, 6):
        assert res_losses[step] == pytest.approx(full_losses[step], rel=1e-5)


def test_checkpoints_are_marked_and_the_best_model_reloads_from_them(tmp_path):
    """Trainer checkpoints and save_model of a patched model are marked (plain transformers refuses them);
    load_best_model_at_end reads a marked checkpoint's weights."""
    from transformers import BertForMaskedLM

    model = tiny_bert()
    trainer = _trainer(tmp_path, model, MLMData(8), max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    first, final = tmp_path / "run" / "checkpoint-1", tmp_path / "final"
    trainer.save_model(str(final))
    for path in (first, final):
        assert guard.is_marked(path), path
        with pytest.raises(ValueError, match=r"fnl_transformers\.hf\.from_pretrained\(path\)"):
            BertForMaskedLM.from_pretrained(path)
    saved = guard.load_weights(first)
    trainer.state.best_model_checkpoint = str(first)
    trainer._load_best_model()
    assert all(torch.equal(p, saved[n]) for n, p in model.state_dict().items() if n in saved)
    assert not all(torch.equal(p, saved[n]) for n, p in params(tiny_bert()).items() if n in saved)


def test_reloaded_patched_model_brings_its_fd_config(tmp_path):
    """save_pretrained + hf.from_pretrained: FNLTrainer finds the FD coefficients and mode in the reloaded model."""
    from fnl_transformers.hf import from_pretrained

    tiny_bert(fd_mode="decoupled").save_pretrained(tmp_path / "saved")
    model = from_pretrained(str(tmp_path / "saved"))
    trainer = _trainer(tmp_path, model, MLMData(4), max_steps=1)
    # fd_embedding unset follows fd_linear (the model has no embedding forms, so it decays nothing more)
    assert trainer.fd.coefficients() == {
        "linear": FD["linear"],
        "embedding": FD["linear"],
        "qk": FD["qk"],
        "ov": FD["ov"],
    }
    assert trainer.fd_mode == "decoupled"
    trainer.train()


def test_decoupled_mode_needs_an_fd_optimizer(tmp_path):
    model = tiny_bert(fd_mode="decoupled")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="applies no FD"):
        _trainer(tmp_path, model, MLMData(4), trainer_kw=dict(optimizers=(opt, None)))


def test_eval_loss_is_the_task_mean(tmp_path):
    """Evaluation reports the plain MLM mean (no FD, no accumulation or world-size factor)."""
    model = tiny_bert()
    data = MLMData(4)
    trainer = _trainer(tmp_path, model, data, per_device_eval_batch_size=4, gradient_accumulation_steps=2)
    got = trainer.evaluate(eval_dataset=data)["eval_loss"]
    model.eval()
    with torch.no_grad():
        want = model(**{k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}).loss
    assert got == pytest.approx(float(want), rel=1e-6)


def test_weight_decay_stays_on_factors_of_kinds_without_fd(tmp_path):
    """FD on OV only (the paper's FLAMBe setting): O/V projections leave the weight-decay group; Q/K projections
    and FFN factors (forms without FD) keep weight decay, unless weight_decay_factors=False."""
    from transformers import BertConfig, BertForMaskedLM

    from fnl_transformers.hf import FNLConfig, patch_model

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=48,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        type_vocab_size=1,
    )
    model = patch_model(BertForMaskedLM(cfg), FNLConfig(rank_scale=0.5, factorize=("ffn",), fd_ov=1e-3))
    trainer = _trainer(tmp_path, model, MLMData())
    decayed = set(trainer.get_decay_parameter_names(model))
    attn = "bert.encoder.layer.0.attention"
    assert {f"{attn}.self.query.weight", f"{attn}.self.key.weight"} <= decayed
    assert not {f"{attn}.self.value.weight", f"{attn}.output.dense.weight"} & decayed
    assert {n for n in decayed if n.endswith((".U", ".V"))}
    assert not {n for n in decayed if "bias" in n or "LayerNorm" in n}

    trainer = _trainer(tmp_path, model, MLMData(), trainer_kw=dict(weight_decay_factors=False))
    decayed = set(trainer.get_decay_parameter_names(model))
    assert not {f"{attn}.self.query.weight", f"{attn}.self.key.weight"} & decayed
    assert not {n for n in decayed if n.endswith((".U", ".V"))}
    assert "bert.embeddings.word_embeddings.weight" in decayed

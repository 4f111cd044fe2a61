"""The BERT recipes (paper Sec. 6, Table 4): NVIDIA's schedule, next-sentence pairs, the three optimizers against
hand formulas and dense products, phase-2 resumption, the sweep and Table 4 runners, the summary layout, and
the smoke pipeline end to end (pretraining x optimizer x head dim x objective x phase, SQuAD, the table)."""

from __future__ import annotations

import json
import math
import os
import random
import re

import pytest
import torch

from fnl_transformers.recipes import bert_data, bert_pretrain, bert_runs, bert_table, schedule, summary
from fnl_transformers.recipes.bert_pretrain import NVIDIA_PHASES

from recipes_helpers import RECIPES, REPO, is_png, last_line, load_json, run_script


# ------------------------------------------------------------------------------ schedule
def test_poly_warmup_hand_values():
    n = NVIDIA_PHASES[1]
    total, warm = n["steps"], n["warmup"]
    f = lambda u: schedule.poly_warmup_factor(u, total, warm)  # noqa: E731
    assert f(1) == pytest.approx(1 / 7038 / 0.2843, rel=1e-12)
    assert f(2000) == pytest.approx(2000 / 7038 / 0.2843, rel=1e-12)  # p = 0.28417 < 0.2843: still warming up
    assert f(2001) == pytest.approx(math.sqrt(1 - 2001 / 7038), rel=1e-12)  # p = 0.28431: decay, not renormalized
    assert 6e-3 * f(2001) == pytest.approx(5.0759e-3, abs=1e-6)  # the drop at the end of warmup
    assert f(3519) == pytest.approx(math.sqrt(0.5), rel=1e-12)
    assert f(7038) == 0.0  # NVIDIA's last update has lr 0
    assert schedule.poly_warmup_factor(5, 10, 0.0, degree=2.0) == pytest.approx(0.25)


def test_poly_warmup_scheduler_sets_the_rate_of_each_update():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=4e-3)
    opt.param_groups[0]["initial_lr"] = 1.0  # a resumed optimizer's previous base rate is replaced
    sched = schedule.poly_warmup_scheduler(opt, total=10, warmup=0.3)
    seen = []
    for _ in range(10):  # Trainer's order: optimizer.step() with the current lr, then scheduler.step()
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [4e-3 * (u / 10) / 0.3 if u / 10 < 0.3 else 4e-3 * (1 - u / 10) ** 0.5 for u in range(1, 11)]
    assert seen == pytest.approx(want, rel=1e-12, abs=1e-15)
    for bad, msg in (((0, 0.1), "integer >= 1"), ((10, 1.0), r"\[0, 1\)"), ((10, -0.1), r"\[0, 1\)")):
        with pytest.raises(ValueError, match=msg):
            schedule.poly_warmup_scheduler(opt, *bad)


# ------------------------------------------------------------------------------ data
def test_read_documents_blank_lines_sentences_and_one_per_line(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("First one. Second one!\nThird?\n\n\nOther doc here.\n\n")
    b = tmp_path / "b.txt"
    b.write_text("Line doc one. It has two.\nLine doc two\n")
    docs = bert_data.read_documents([str(a), str(b)])
    assert docs == [
        ["First one.", "Second one!", "Third?"],
        ["Other doc here."],
        ["Line doc one.", "It has two."],
        ["Line doc two"],
    ]
    assert bert_data.split_sentences("Dr. smith came. 3 cats left.") == ["Dr. smith came.", "3 cats left."]
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(bert_data.DataError, match="is empty"):
        bert_data.read_documents([str(tmp_path / "e.txt")])
    with pytest.raises(bert_data.DataError, match="not found"):
        bert_data.read_documents([str(tmp_path / "nope.txt")])


def _coded_docs(n_docs=60, seed=0):
    """Documents whose every token names (document, sentence): token = 1000 * doc + sentence."""
    rng = random.Random(seed)
    return [[[1000 * d + s] * rng.randint(3, 12) for s in range(rng.randint(2, 9))] for d in range(n_docs)]


def test_nsp_pairs_follow_create_pretraining_data():
    docs = _coded_docs(200)
    seq_len = 40
    pairs = bert_data.nsp_instances(docs, seq_len, random.Random(3))
    assert len(pairs) > 300
    whole = next_whole = 0
    for a, b, label in pairs:
        assert a and b and len(a) + len(b) <= seq_len - 3
        da, db = {t // 1000 for t in a}, {t // 1000 for t in b}
        assert len(da) == 1 and len(db) == 1  # each side from one document
        assert (db == da) == (label == 0)  # "is next" from the same document, "random" from another
        sa, sb = sorted({t % 1000 for t in a}), sorted({t % 1000 for t in b})
        assert sa == list(range(sa[0], sa[-1] + 1)) and sb == list(range(sb[0], sb[-1] + 1))  # runs of sentences
        doc_a, doc_b = docs[a[0] // 1000], docs[b[0] // 1000]
        if a == [t for s in doc_a[sa[0] : sa[-1] + 1] for t in s] and b == [
            t for s in doc_b[sb[0] : sb[-1] + 1] for t in s
        ]:
            whole += 1  # not trimmed: whole sentences, and an "is next" B starts right after A
            next_whole += label == 0
            assert label == 1 or sb[0] == sa[-1] + 1
    assert whole > 0.5 * len(pairs) and next_whole > 100
    random_share = sum(label for _, _, label in pairs) / len(pairs)
    assert 0.45 < random_share < 0.75  # 1/2, plus every one-sentence chunk
    # a sentence pair never splits a sentence unless the pair is trimmed to fit
    a, b = [1] * 30, [2] * 5
    bert_data.truncate_pair(a, b, 20, random.Random(0))
    assert (len(a), len(b)) == (15, 5)
    with pytest.raises(bert_data.DataError, match="too short"):
        bert_data.nsp_instances(docs, 6, random.Random(0))


def test_encode_pair_blocks_and_held_out_split():
    enc = bert_data.encode_pair([5, 6], [7], 1, cls_id=2, sep_id=3)
    assert enc == {"input_ids": [2, 5, 6, 3, 7, 3], "token_type_ids": [0, 0, 0, 0, 1, 1], "next_sentence_label": 1}
    docs = [[[10, 11], [12]], [[20]], [[30, 31, 32]]]
    blocks = bert_data.mlm_blocks(docs, 5, cls_id=2, sep_id=3)
    assert [b["input_ids"] for b in blocks] == [[2, 10, 11, 12, 3], [2, 3, 20, 3, 3], [2, 30, 31, 32, 3]]
    train, held = bert_data.held_out_split(docs, 4)
    assert (train, held) == (docs[:1], docs[1:])  # the last documents with >= 4 tokens
    with pytest.raises(bert_data.DataError, match="smaller --eval-tokens"):
        bert_data.held_out_split(docs, 7)


# ------------------------------------------------------------------------------ optimizers
def _tiny_bert(head_dim=None, fd_ov=0.0, mode="coupled", seed=0, **extra):
    from transformers import BertConfig, BertForPreTraining

    from fnl_transformers.hf import FNLConfig, patch_model

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return patch_model(BertForPreTraining(cfg), FNLConfig(head_dim=head_dim, fd_ov=fd_ov, fd_mode=mode, **extra))


def _scale_ov(model, factor):
    """Larger OV weights than BERT's 0.02-std init, so that the FD terms are far above float32 rounding."""
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.value.weight.mul_(factor)
            layer.attention.output.dense.weight.mul_(factor)
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, 10), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2:5] = ids[:, 2:5]
    return {
        "input_ids": ids,
        "token_type_ids": (torch.arange(10) >= 5).long().expand(3, 10).clone(),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "next_sentence_label": torch.tensor([0, 1, 0]),
    }


def _ov_heads(model):
    """(W_o,h, W_v,h) per layer and head, sliced from the dense projection weights."""
    out = []
    for layer in model.bert.encoder.layer:
        wv, wo = layer.attention.self.value.weight, layer.attention.output.dense.weight
        heads = model.config.num_attention_heads
        d = wv.shape[0] // heads
        out += [(wo[:, h * d : (h + 1) * d], wv[h * d : (h + 1) * d]) for h in range(heads)]
    return out


def _dense_fd(model, lam):
    with torch.no_grad():
        return lam / 2 * sum(float(torch.linalg.matrix_norm(o.double() @ v.double()) ** 2) for o, v in _ov_heads(model))


@pytest.mark.parametrize("head_dim", [None, 2])
def test_lamb_fd_adds_the_ov_penalty_to_the_loss_and_no_fd_to_the_update(head_dim, tmp_path):
    from transformers import TrainingArguments

    from fnl_transformers.optim import FLAMBe, Lamb

    lam = 0.3
    model = _scale_ov(_tiny_bert(head_dim, lam, "coupled"), 10)
    opt = bert_pretrain.build_optimizer(model, "lamb-fd", lr=0.1, weight_decay=0.05, fd_ov=lam)
    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3)
    trainer = bert_pretrain.make_trainer(model, "lamb-fd", lam, opt, None, targs, None, None)
    batch = _batch()
    model.train()
    with torch.no_grad():
        total = float(trainer.compute_loss(model, dict(batch)))
        task = float(model(**batch).loss)
    fd = _dense_fd(model, lam)
    assert fd > 0.1 * task  # the penalty is not negligible next to the task loss
    assert total - task == pytest.approx(fd, rel=1e-5)
    # the optimizer: plain Lamb, no group with FD, and the OV factors without any decay
    assert type(opt) is Lamb and not any(g.get("fd") or g.get("fd_forms") for g in opt.param_groups)
    ov_params = [
        w
        for layer in model.bert.encoder.layer
        for w in (layer.attention.self.value.weight, layer.attention.output.dense.weight)
    ]
    other = model.bert.encoder.layer[0].intermediate.dense.weight
    for o in (opt, bert_pretrain.build_optimizer(model, "flambe", 0.1, 0.05, lam)):
        before = [p.detach().clone() for p in ov_params]
        other_before = other.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        o.step()  # zero gradients: only decay terms move a weight
        moved = [not torch.equal(b, p) for b, p in zip(before, ov_params)]
        assert not torch.equal(other_before, other)  # weight decay elsewhere, in both
        assert all(moved) if isinstance(o, FLAMBe) else not any(moved)  # FD only in FLAMBe's update


def test_flambe_first_step_on_a_patched_bert_is_the_hand_formula():
    lam, wd, lr, eps = 0.5, 0.1, 0.05, 1e-6
    model = _scale_ov(_tiny_bert(2, lam, "decoupled", **bert_pretrain.mha_spectral_init_fields()), 10)
    opt = bert_pretrain.build_optimizer(model, "flambe", lr=lr, weight_decay=wd, fd_ov=lam)
    model.train()
    model(**_batch()).loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone().double() for n, p in model.named_parameters()}
    # hand formula: d = lambda dFD/dw for OV factors (FD = 1/2 sum_h ||O_h V_h||_F^2, weights before the step),
    # wd * w for the other weights, 0 for biases and LayerNorms; r = g / (|g| + eps) + d on the first step
    decay = {}
    for layer in range(2):
        pre = f"bert.encoder.layer.{layer}.attention."
        wv, wo = before[pre + "self.value.weight"], before[pre + "output.dense.weight"]
        d = wv.shape[0] // 4
        dv, do = torch.zeros_like(wv), torch.zeros_like(wo)
        for h in range(4):
            Vh, Oh = wv[h * d : (h + 1) * d], wo[:, h * d : (h + 1) * d]
            do[:, h * d : (h + 1) * d] = Oh @ Vh @ Vh.T
            dv[h * d : (h + 1) * d] = Oh.T @ Oh @ Vh
        decay[pre + "self.value.weight"], decay[pre + "output.dense.weight"] = lam * dv, lam * do
    opt.step()
    checked = fd_effect = 0
    for p in model.parameters():
        n = names[id(p)]
        w, g = before[n], grads[n]
        no_decay = n.endswith("bias") or "LayerNorm" in n
        d = decay.get(n, torch.zeros_like(w) if no_decay else wd * w)
        r = g / (g.abs() + eps) + d
        trust = float(w.norm() / r.norm()) if w.norm() > 0 and r.norm() > 0 else 1.0
        want = -lr * trust * r
        got = p.detach().double() - w
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-8), n
        if n in decay:  # without the FD term (weight decay in its place) the step would differ far beyond tolerance
            r0 = g / (g.abs() + eps) + wd * w
            fd_effect += not torch.allclose(got, -lr * float(w.norm() / r0.norm()) * r0, rtol=1e-2, atol=1e-6)
        checked += 1
    assert checked == len(list(model.parameters())) and fd_effect == 4


def test_build_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'adam': use one of lamb, lamb-fd, flambe"):
        bert_pretrain.build_optimizer(_tiny_bert(), "adam", 0.1, 0.0, 0.0)


# ------------------------------------------------------------------------------ runners (fake runs)
def _fake_run(calls, losses):
    def run(job):
        calls.append(job.name)
        args = job.parse()
        os.makedirs(job.out, exist_ok=True)
        coef = args.weight_decay if args.optimizer == "lamb" else args.fd_ov
        with open(job.results, "w") as f:
            json.dump(
                {
                    "recipe": "bert-mlm",
                    "metric": "mlm_loss",
                    "score": 0,
                    "optimizer": args.optimizer,
                    "coef": coef,
                    "weight_decay": 0.01 if args.weight_decay is None else args.weight_decay,
                    "mlm_loss": losses[(args.optimizer, coef)] + 0.01 * args.seed,
                    "args": vars(args),
                },
                f,
            )

    return run


def test_sweep_lists_runs_resumes_and_selects_by_held_out_mlm_loss(tmp_path, monkeypatch, capsys):
    losses = {
        ("lamb", 0.0): 3.0,
        ("lamb", 0.01): 2.5,
        ("lamb-fd", 0.1): 2.7,
        ("lamb-fd", 1.0): 2.8,
        ("flambe", 0.1): 2.9,
        ("flambe", 1.0): 2.4,
    }
    calls = []
    monkeypatch.setattr(bert_runs.Job, "run", _fake_run(calls, losses))
    out = str(tmp_path / "sw")
    argv = ["sweep", "--out", out, "--wd-grid", "0,0.01", "--fd-grid", "0.1,1", "--seeds", "0,1", "--", "--corpus", "x"]
    assert bert_runs.main(argv[:-3] + ["--dry-run"] + argv[-3:]) == 0
    listing = capsys.readouterr().out
    assert "12 runs, 0 finished, 12 to run" in listing and not calls
    assert (
        f"[todo] flambe-c1-s1: recipes/bert/pretrain.sh flambe --head-dim full --objective mlm-nsp --seed 1 "
        f"--fd-ov 1 --corpus x --out {out}/flambe-c1-s1"
    ) in listing
    assert bert_runs.main(argv) == 0 and len(calls) == 12
    sel = load_json(os.path.join(out, "selection.json"))
    assert {k: v["coef"] for k, v in sel["optimizers"].items()} == {"lamb": 0.01, "lamb-fd": 0.1, "flambe": 1.0}
    assert sel["optimizers"]["lamb"]["grid"]["0.01"] == {"mlm_loss": 2.505, "seeds": 2} and sel["complete"]
    assert "| flambe | FD 1 (wd 0.01) | 2.4050 | 2 | **selected** |" in open(os.path.join(out, "selection.md")).read()
    capsys.readouterr()
    assert bert_runs.main(argv) == 0 and len(calls) == 12  # finished runs are skipped
    assert "12 runs, 12 finished, 0 to run" in capsys.readouterr().out
    assert bert_runs.main(["sweep", "--out", out, "--wd-grid", "0", "--optimizers", "lamb", "--", "--corpus", "y"]) == 2
    assert "holds a finished run of another command (it differs in corpus)" in last_line(capsys.readouterr().err)
    assert bert_runs.main(["sweep", "--out", out, "--fd-grid", "0,1"]) == 2
    assert "--fd-grid: FD 0 is lamb" in capsys.readouterr().err


def test_table4_chains_phases_and_squad_with_selected_coefficients(tmp_path, capsys):
    sel = tmp_path / "selection.json"
    sel.write_text(
        json.dumps(
            {
                "optimizers": {
                    "lamb": {"coef": 0.001, "weight_decay": 0.001},
                    "lamb-fd": {"coef": 0.1, "weight_decay": 0.01},
                    "flambe": {"coef": 1.0, "weight_decay": 0.01},
                }
            }
        )
    )
    out = str(tmp_path / "t4")
    argv = ["table4", "--out", out, "--selection", str(sel), "--squad-dataset", "squad", "--seeds", "0,1", "--dry-run"]
    assert bert_runs.main(argv) == 0
    text = capsys.readouterr().out
    assert "36 runs, 0 finished, 36 to run" in text  # 2 seeds x 3 optimizers x 2 head dims x (2 phases + SQuAD)
    assert (
        f"recipes/bert/pretrain.sh flambe --objective mlm-nsp --seed 1 --fd-ov 1 --weight-decay 0.01 --phase 2 "
        f"--resume {out}/flambe-half-mlm-nsp-s1/phase1 --out {out}/flambe-half-mlm-nsp-s1/phase2"
    ) in text
    assert (
        f"recipes/bert/squad.sh --model {os.path.abspath(out)}/lamb-full-mlm-nsp-s0/phase2/model --dataset squad "
        f"--out {out}/lamb-full-mlm-nsp-s0/squad"
    ) in text
    assert "pretrain.sh lamb --objective mlm-nsp --seed 0 --weight-decay 0.001 --head-dim full" in text
    assert bert_runs.main(["table4", "--out", out, "--dry-run"]) == 2
    assert "--squad-dataset squad (online), or --no-squad" in last_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------ summary (Table 4 layout)
def _write(path, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(kw, f)


def _pretrain_chain(root, opt, head, seed, loss, params):
    base = os.path.join(root, f"{opt}-{head}-s{seed}")
    common = dict(
        recipe="bert-mlm",
        metric="mlm_loss",
        optimizer=opt,
        head_dim_label=head,
        head_dim=64 if head == "full" else 32,
        objective="mlm-nsp",
        coef=0.01,
        weight_decay=0.01,
        seed=seed,
        params=params,
    )
    for phase, start in ((1, 0), (2, 10)):
        out = os.path.join(base, f"phase{phase}")
        curve = os.path.join(out, "loss_curve.json")
        _write(
            curve,
            phase_start=start,
            eval=[{"update": start + u, "mlm_loss": loss + 1 - 0.1 * u - phase} for u in range(0, 11, 5)],
        )
        _write(
            os.path.join(out, "mlm.eval.results.json"),
            score=loss,
            mlm_loss=loss + (2 - phase),
            phase=phase,
            out=out,
            model_dir=os.path.join(out, "model"),
            loss_curve=curve,
            resumed_from=os.path.join(base, "phase1") if phase == 2 else None,
            **common,
        )
    return os.path.join(base, "phase2", "model")


def test_summary_writes_the_table4_layout(tmp_path):
    root = str(tmp_path / "runs")
    for opt, head, seed, loss, em, f1, params in (
        ("flambe", "half", 0, 2.0, 50.0, 60.0, 900),
        ("lamb", "full", 0, 2.2, 70.0, 80.0, 1000),
        ("lamb", "full", 1, 2.4, 74.0, 82.0, 1000),
        ("lamb-fd", "full", 0, 2.1, 71.0, 81.0, 1000),
    ):
        model = _pretrain_chain(root, opt, head, seed, loss, params)
        _write(
            os.path.join(root, f"squad-{opt}-{head}-{seed}", "squad.dev.results.json"),
            recipe="squad",
            metric="f1",
            score=f1,
            f1=f1,
            exact_match=em,
            model_dir=model,
        )
    _write(
        os.path.join(root, "minilm", "squad.dev.results.json"),
        recipe="squad",
        metric="f1",
        score=90.0,
        f1=90.0,
        exact_match=85.0,
        model_dir="/elsewhere/model",
        variant="minilm",
    )
    _write(
        os.path.join(root, "iwslt", "checkpoint_best.test.results.json"),
        recipe="iwslt14",
        metric="bleu",
        score=30.0,
        variant="baseline",
        params=5,
    )
    out = summary.summarize([root], str(tmp_path / "sum"))
    text = out["markdown"]
    rows = [line for line in text.splitlines() if line.startswith("| LAMB") or line.startswith("| FLAMBe")]
    assert rows == [
        "| LAMB | full (64) | mlm-nsp | 1+2 | wd 0.01 | 2 | 1,000 | 2.300 ± 0.141 | 72.00 ± 2.83 | 81.00 ± 1.41 |",
        "| LAMB + FD in the loss | full (64) | mlm-nsp | 1+2 | FD 0.01, wd 0.01 | 1 | 1,000 | 2.100 | 71.00 | 81.00 |",
        "| FLAMBe | half (32) | mlm-nsp | 1+2 | FD 0.01, wd 0.01 | 1 | 900 | 2.000 | 50.00 | 60.00 |",
    ]
    # the other results keep the per-metric tables: IWSLT BLEU, and SQuAD of a model not pretrained here
    assert "### BLEU" in text and "| minilm | minilm | 90.00 |" in text and "| iwslt | baseline | 30.00 |" in text
    assert [os.path.basename(p) for p in out["plots"]] == ["summary.png", "bert_mlm_curves.png"]
    assert all(is_png(p) for p in out["plots"])
    assert (
        bert_table.chains([r for r in summary.load(summary.find_results([root])) if r["recipe"] == "bert-mlm"])
        and len(bert_table.groups(summary.load(summary.find_results([root])))) == 3
    )


# ------------------------------------------------------------------------------ README
def test_readme_states_nvidias_values_and_the_defaults():
    text = open(os.path.join(REPO, "recipes", "README.md")).read()
    n1, n2 = NVIDIA_PHASES[1], NVIDIA_PHASES[2]
    for key, label in (
        ("seq_len", "sequence length"),
        ("global_batch", "global batch"),
        ("lr", "peak learning rate"),
        ("warmup", "warmup proportion"),
        ("steps", "updates"),
    ):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        for cell in cells[1:3]:  # NVIDIA's column and ours: phase 1 / phase 2
            assert [float(x) for x in re.findall(r"[\d.]+(?:e-?\d+)?", cell)] == [n1[key], n2[key]], (label, cell)
    assert "What the default reproduces" in text and "What it changes" in text


# ------------------------------------------------------------------------------ pretraining runs (tiny, in-process)
TINY = [
    "--smoke",
    "--hidden",
    "32",
    "--heads",
    "2",
    "--layers",
    "1",
    "--batch-size",
    "4",
    "--eval-tokens",
    "512",
    "--curve-points",
    "2",
    "--objective",
    "mlm",
]


@pytest.mark.slow
def test_phase2_resumes_and_errors(tmp_path, capsys):
    p1, p2, p3 = (str(tmp_path / n) for n in ("p1", "p2", "p3"))
    assert bert_pretrain.main(["lamb-fd", *TINY, "--max-steps", "3", "--head-dim", "half", "--out", p1]) == 0
    assert (
        bert_pretrain.main(
            [
                "lamb-fd",
                *TINY,
                "--phase",
                "2",
                "--resume",
                p1,
                "--max-steps",
                "2",
                "--reset-optimizer-step",
                "--out",
                p2,
            ]
        )
        == 0
    )
    r = load_json(os.path.join(p2, "mlm.eval.results.json"))
    assert (r["optimizer_steps_before"], r["optimizer_steps"], r["total_updates"]) == (3, 2, 5)  # NVIDIA's reset
    assert (r["seq_len"], r["lr"], r["head_dim"], r["fd_ov"]) == (128, 5e-3, 8, 0.01)  # 32 wide, 2 heads: 16 -> 8
    state = torch.load(os.path.join(p2, "optimizer.pt"), weights_only=True)
    assert {s["step"] for s in state["state"].values()} == {2}
    assert load_json(os.path.join(p2, "loss_curve.json"))["eval"][0]["update"] == 3
    for argv, msg in (
        (["flambe", "--phase", "2", "--resume", p1], "pretrained with the optimizer lamb-fd"),
        (["lamb-fd", "--phase", "2", "--resume", p1, "--objective", "mlm-nsp"], "with --objective mlm"),
        (["lamb-fd", "--phase", "2", "--resume", p1, "--head-dim", "full"], "drop --head-dim full"),
        (["lamb-fd", "--phase", "2"], "--phase 2 needs --resume"),
        (["lamb-fd", "--phase", "2", "--resume", p3], "no mlm.eval.results.json there"),
        (["lamb-fd", "--resume", p1], "are for --phase 2"),
        (["flambe", "--fd-ov", "0"], "needs --fd-ov > 0"),
        (["lamb", "--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
        (["lamb", "--mlm-prob", "1.5"], "--mlm-prob is the share of masked tokens"),
        (["lamb", "--curve-points", "0"], "--curve-points must be at least 1"),
        (["lamb", "--warmup-proportion", "1"], "(--max-steps, --warmup-proportion)"),
    ):
        assert bert_pretrain.main([argv[0], *TINY, *argv[1:], "--out", p3]) == 2
        err = last_line(capsys.readouterr().err)
        assert err.startswith("pretrain: error:") and msg in err, (argv, err)
    assert not os.path.exists(os.path.join(p3, "mlm.eval.results.json"))


# ------------------------------------------------------------------------------ the smoke pipeline end to end
@pytest.fixture(scope="module")
def table4_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("t4") / "t4"
    r = run_script(os.path.join(RECIPES, "bert", "table4.sh"), "--smoke", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


@pytest.mark.slow
def test_table4_smoke_every_optimizer_head_dim_objective_and_phase(table4_smoke):
    from fnl_transformers.recipes.squad_metric import evaluate

    out, stdout = table4_smoke
    runs = {}
    for opt in bert_pretrain.OPTIMIZERS:
        for head in ("full", "half"):
            for objective in ("mlm-nsp", "mlm"):
                base = out / f"{opt}-{head}-{objective}-s0"
                p1, p2 = (load_json(base / f"phase{k}" / "mlm.eval.results.json") for k in (1, 2))
                assert (p1["phase"], p2["phase"], p1["seq_len"], p2["seq_len"]) == (1, 2, 64, 128)
                # phase 2 continues phase 1: the optimizer's step count and the update count go on
                assert p2["optimizer_steps_before"] == p1["updates"] == p1["optimizer_steps"] == 12
                assert p2["optimizer_steps"] == p2["total_updates"] == 12 + 6
                assert (p2["optimizer"], p2["objective"], p2["head_dim_label"]) == (opt, objective, head)
                assert p2["mlm_loss"] < math.log(p2["params"])  # finite, a real loss
                assert ("nsp_loss" in p2) == (objective == "mlm-nsp")
                assert p2["mha_si"] == (opt == "flambe")  # FLAMBe's heads balanced by per-head SI, as in the paper
                assert p2["mha_si_full_dim"] == (opt == "flambe" and bool(bert_pretrain.mha_spectral_init_fields()))
                assert (
                    p2["regularizer"]
                    == {
                        "lamb": "weight_decay",
                        "lamb-fd": "fd_ov_in_loss+weight_decay",
                        "flambe": "decoupled_fd_ov+weight_decay",
                    }[opt]
                )
                sq = load_json(base / "squad" / "squad.dev.results.json")
                preds = json.load(open(sq["predictions"]))
                dev = json.load(open(base / "squad" / "data" / "dev-v1.1.json"))["data"]
                for article in dev:  # the smoke fine-tuning uses the first 60 questions (--limit)
                    for par in article["paragraphs"]:
                        par["qas"] = [q for q in par["qas"] if q["id"] in preds]
                again = evaluate(dev, preds)
                assert sq["questions"] == len(preds) == 60
                assert (sq["f1"], sq["exact_match"]) == (round(again["f1"], 2), round(again["exact_match"], 2))
                assert sq["model_dir"] == p2["model_dir"]
                runs[(opt, head, objective)] = p2
    for opt in bert_pretrain.OPTIMIZERS:
        assert runs[(opt, "half", "mlm")]["params"] < runs[(opt, "full", "mlm")]["params"]
        assert (runs[(opt, "full", "mlm")]["head_dim"], runs[(opt, "half", "mlm")]["head_dim"]) == (16, 8)
    table = open(out / "summary.md").read()
    rows = [line for line in table.splitlines() if re.match(r"\| (LAMB|FLAMBe)", line)]
    assert len(rows) == 12
    p = runs[("flambe", "half", "mlm-nsp")]
    assert re.search(
        rf"^\| FLAMBe \| half \(8\) \| mlm-nsp \| 1\+2 \| FD 0.01, wd 0.01 \| 1 \| {p['params']:,} \| "
        rf"{p['mlm_loss']:.3f} \|",
        table,
        re.M,
    )
    assert is_png(out / "bert_mlm_curves.png")
    assert f"table: {out}/summary.md" in stdout and f"plot:  {out}/bert_mlm_curves.png" in stdout


@pytest.mark.slow
def test_table4_smoke_again_runs_nothing(table4_smoke):
    out, _ = table4_smoke
    r = run_script(os.path.join(RECIPES, "bert", "table4.sh"), "--smoke", "--out", str(out), "--dry-run")
    assert r.returncode == 0 and "36 runs, 36 finished, 0 to run" in r.stdout


@pytest.mark.slow
def test_sweep_smoke(tmp_path):
    sweep = os.path.join(RECIPES, "bert", "sweep.sh")
    out = tmp_path / "sw"
    r = run_script(sweep, "--smoke", "--out", str(out), "--optimizers", "lamb-fd")
    assert r.returncode == 0, r.stderr[-3000:]
    sel = load_json(out / "selection.json")
    assert set(sel["optimizers"]) == {"lamb-fd"} and sel["complete"]
    for opt, grid in (("lamb-fd", bert_runs.SMOKE_FD_GRID),):
        got = {float(c): v["mlm_loss"] for c, v in sel["optimizers"][opt]["grid"].items()}
        assert sorted(got) == sorted(grid)
        assert got[sel["optimizers"][opt]["coef"]] == min(got.values())
        for c in grid:
            res = load_json(out / f"{opt}-c{c:g}-s0" / "mlm.eval.results.json")
            assert (res["head_dim_label"], res["phase"], res["coef"]) == ("full", 1, c)
            assert got[c] == res["mlm_loss"]
    r = run_script(sweep, "--smoke", "--out", str(out), "--optimizers", "lamb-fd")
    assert r.returncode == 0 and "2 runs, 2 finished, 0 to run" in r.stdout

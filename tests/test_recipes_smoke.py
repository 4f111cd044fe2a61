"""End-to-end smoke runs of every recipe (slow): the IWSLT-14 demo pipeline (prepare --smoke, train, evaluate,
table + plot), every other train.sh variant for a few updates, the Figure 4 sweep's mini grid (both panels, the
table with every grid point, resuming), prepare.sh --raw-dir on a small corpus, BERT pretraining (Lamb full /
FLAMBe half, 300 updates; the other BERT runs are in test_recipes_bert.py) and SQuAD fine-tuning of the real
MiniLM. Scores are recomputed here from the written hypotheses / predictions with sacrebleu and the SQuAD metric
and must equal the results JSONs."""

from __future__ import annotations

import glob
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from fnl_transformers.recipes import synthetic
from fnl_transformers.recipes.squad_metric import evaluate

from recipes_helpers import RECIPES, is_png, last_line, load_json, run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = run_script(os.path.join(RECIPES, "demo.sh"), "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def _result(run_dir):
    paths = glob.glob(os.path.join(run_dir, "checkpoint_*.test.results.json"))
    assert len(paths) == 1, paths
    return load_json(paths[0])


def test_demo_learns_and_scores_with_sacrebleu(demo):
    import sacrebleu

    out, stdout = demo
    refs = open(out / "data" / "clean" / "test.en").read().splitlines()
    scores = {}
    for run in ("untrained", "baseline", "lowrank-si-fd"):
        res = _result(out / run)
        hyps = open(res["hypotheses"]).read().splitlines()
        assert len(hyps) == len(refs) == res["sentences"] == 400
        bleu = sacrebleu.corpus_bleu(hyps, [refs])
        assert res["bleu"] == res["score"] == round(bleu.score, 2)
        assert res["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
        assert res["beam"] == 5 and res["subset"] == "test"
        scores[run] = res
    # learning, not a pipeline that runs: both variants far above the untrained model
    assert scores["untrained"]["bleu"] < 5 and scores["untrained"]["updates"] == 0
    for run in ("baseline", "lowrank-si-fd"):
        assert scores[run]["bleu"] > 60, scores[run]
        assert scores[run]["updates"] == 300
    # the low-rank model is smaller (factorized FFN and embeddings at rank scale 0.5), same data
    assert scores["lowrank-si-fd"]["params"] < scores["baseline"]["params"] == scores["untrained"]["params"]
    assert (scores["lowrank-si-fd"]["rank_scale"], scores["lowrank-si-fd"]["coef"]) == (0.5, 1e-4)
    table = open(out / "summary.md").read()
    for run in ("untrained", "baseline", "lowrank-si-fd"):
        assert re.search(rf"^\| {run} \| .* \| {scores[run]['bleu']:.2f} \| {scores[run]['params']:,} \|", table, re.M)
    assert is_png(out / "summary.png")
    assert f"table: {out}/summary.md" in stdout and f"plot:  {out}/summary.png" in stdout
    assert "test BLEU: untrained" in stdout


def test_prepare_and_train_are_idempotent(demo):
    out, _ = demo
    prepare = os.path.join(RECIPES, "iwslt14", "prepare.sh")
    r = run_script(prepare, "--smoke", "--out", str(out / "data"))
    assert r.returncode == 0 and "already prepared" in r.stdout
    r = run_script(prepare, "--smoke", "--out", str(out / "data"), "--vocab-size", "400")
    assert r.returncode == 2 and "was prepared with other settings" in last_line(r.stderr) and "--force" in r.stderr
    # the same training command again: nothing retrained (fairseq would resume and add an update)
    before = os.path.getmtime(out / "baseline" / "checkpoint_best.pt")
    r = run_script(
        os.path.join(RECIPES, "iwslt14", "train.sh"),
        "baseline",
        "--smoke",
        "--data",
        str(out / "data"),
        "--save-dir",
        str(out / "baseline"),
    )
    assert r.returncode == 0 and "already trained" in r.stdout
    assert os.path.getmtime(out / "baseline" / "checkpoint_best.pt") == before


VARIANT_LOG_KEYS = {
    "wd": [],
    "fd-ov": ["fd_ov"],
    "fd-qkov": ["fd_qk", "fd_ov"],
    "lowrank-nosi": ["fd_linear", "fd_qk", "fd_ov"],
    "head-dim-half": ["fd_qk", "fd_ov"],
}


def test_every_other_variant_trains(demo, tmp_path):
    out, _ = demo
    train = os.path.join(RECIPES, "iwslt14", "train.sh")

    def one(v):
        return v, run_script(
            train, v, "--smoke", "--data", str(out / "data"), "--save-dir", str(tmp_path / v), "--max-update", "3"
        )

    with ThreadPoolExecutor(2) as pool:
        runs = dict(pool.map(one, VARIANT_LOG_KEYS))
    params = {}
    for v, r in runs.items():
        assert r.returncode == 0, (v, r.stderr[-2000:])
        assert os.path.isfile(tmp_path / v / "checkpoint_best.pt")
        log = open(tmp_path / v / "train.log").read()
        assert "num_updates 3" in log or "num_updates=3" in log, v
        for key in VARIANT_LOG_KEYS[v]:
            assert f"{key}=" in log or f"{key} " in log, (v, key)
        params[v] = int(re.search(r"num\. shared model params: ([\d,]+)", log).group(1).replace(",", ""))
        info = load_json(tmp_path / v / "recipe.json")
        assert info["variant"] == v and info["smoke"] is True
    dense = _result(out / "baseline")["params"]
    assert params["wd"] == params["fd-ov"] == params["fd-qkov"] == dense
    assert params["lowrank-nosi"] < dense and params["head-dim-half"] < dense


def test_prepare_raw_dir_small_corpus(tmp_path):
    raw = tmp_path / "raw"
    synthetic.write_parallel(str(raw), "fr", "es", sizes=(400, 30, 30), seed=9)
    prepare = os.path.join(RECIPES, "iwslt14", "prepare.sh")
    r = run_script(prepare, "--raw-dir", str(raw), "--src", "fr", "--tgt", "es", "--out", str(tmp_path / "big"))
    assert r.returncode == 2
    m = re.search(
        r"--vocab-size 10000 is too large for this training corpus: pass --vocab-size (\d+) or less",
        last_line(r.stderr),
    )
    assert m, r.stderr
    assert not os.path.exists(tmp_path / "big" / "bin")  # nothing that looks prepared
    out = tmp_path / "out"
    r = run_script(
        prepare, "--raw-dir", str(raw), "--src", "fr", "--tgt", "es", "--out", str(out), "--vocab-size", "300"
    )
    assert r.returncode == 0, r.stderr
    info = load_json(out / "bin" / "fnl_prepare.json")
    assert info["pairs"] == {"train": 400, "valid": 30, "test": 30} and info["vocab_size"] == 300
    for name in ("dict.fr.txt", "dict.es.txt", "train.fr-es.fr.bin", "test.fr-es.es.idx"):
        assert os.path.isfile(out / "bin" / name)
    assert open(out / "bin" / "dict.fr.txt").read() == open(out / "bin" / "dict.es.txt").read()  # joined
    assert open(info["test_ref"]).read() == open(raw / "test.es").read()  # references untouched
    r = run_script(
        prepare, "--raw-dir", str(raw), "--src", "fr", "--tgt", "es", "--out", str(out), "--vocab-size", "300"
    )
    assert r.returncode == 0 and "already prepared" in r.stdout


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    pretrain = os.path.join(RECIPES, "bert", "pretrain.sh")
    runs = {}
    for opt, head in (("lamb", "full"), ("flambe", "half")):
        r = run_script(pretrain, opt, "--head-dim", head, "--smoke", "--out", str(root / f"{opt}-{head}"))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[(opt, head)] = load_json(root / f"{opt}-{head}" / "mlm.eval.results.json")
    return root, runs


def test_bert_pretrain_smoke(pretrained):
    root, runs = pretrained
    lamb, flambe = runs[("lamb", "full")], runs[("flambe", "half")]
    for res in (lamb, flambe):
        assert res["metric"] == "mlm_loss" and res["updates"] == 300 and res["masked_tokens"] > 300
        assert res["objective"] == "mlm-nsp" and res["phase"] == 1 and res["eval_pairs"] > 100
        assert res["mlm_loss"] < res["unigram_baseline_loss"] - 0.2  # learned context beyond token frequencies
    assert (lamb["head_dim"], flambe["head_dim"]) == (32, 16)
    assert flambe["params"] < lamb["params"]
    assert (lamb["regularizer"], lamb["fd_ov"], flambe["regularizer"], flambe["fd_ov"]) == (
        "weight_decay",
        0.0,
        "decoupled_fd_ov+weight_decay",
        0.01,
    )
    curve = load_json(lamb["loss_curve"])["eval"]
    assert curve[0]["update"] == 0 and curve[-1]["update"] == 300 and curve[-1]["mlm_loss"] < curve[0]["mlm_loss"] - 1
    from fnl_transformers.hf import from_pretrained

    model = from_pretrained(flambe["model_dir"])  # strict load of the patched (half-head) model
    assert sum(p.numel() for p in model.parameters()) == flambe["params"]


def test_squad_smoke_minilm_and_pretrained(pretrained, tmp_path):
    squad = os.path.join(RECIPES, "bert", "squad.sh")
    root, runs = pretrained
    results = {}
    for name, args in (
        ("minilm", []),
        ("untrained-head", ["--eval-only"]),
        ("from-pretrain", ["--model", runs[("flambe", "half")]["model_dir"], "--epochs", "1"]),
    ):
        r = run_script(squad, "--smoke", "--out", str(tmp_path / name), *args)
        assert r.returncode == 0, r.stderr[-3000:]
        res = load_json(tmp_path / name / "squad.dev.results.json")
        dev = json.load(open(tmp_path / name / "data" / "dev-v1.1.json"))["data"]
        preds = json.load(open(res["predictions"]))
        again = evaluate(dev, preds)  # the official-semantics metric on the written predictions
        assert (res["f1"], res["exact_match"]) == (round(again["f1"], 2), round(again["exact_match"], 2))
        assert res["questions"] == 120 and res["unanswered"] == 0
        results[name] = res
    assert results["minilm"]["f1"] > 80 and results["minilm"]["updates"] > 0
    assert results["untrained-head"]["f1"] < 40 and results["untrained-head"]["updates"] == 0
    assert results["minilm"]["params"] == results["untrained-head"]["params"] > 20_000_000  # the real MiniLM
    assert results["from-pretrain"]["params"] < 1_000_000  # the tiny pretrained BERT, half heads kept

    from fnl_transformers.recipes.summary import summarize

    s = summarize([str(tmp_path), str(root)], str(tmp_path / "summary"))
    # MiniLM's SQuAD runs in the table by metric; the pretrained runs and the SQuAD of one in the Table 4 layout
    assert "### SQuAD v1.1 F1" in s["markdown"] and "| minilm |" in s["markdown"]
    f = results["from-pretrain"]
    assert re.search(
        rf"^\| FLAMBe \| half \(16\) \| mlm-nsp \| 1 \| .* \| {f['exact_match']:.2f} \| {f['f1']:.2f} \|$",
        s["markdown"],
        re.M,
    )
    assert "| from-pretrain |" not in s["markdown"]
    assert all(is_png(p) for p in s["plots"]) and len(s["plots"]) == 2


def test_eval_refuses_a_checkpoint_of_another_configuration(demo, tmp_path):
    import shutil

    out, _ = demo
    for name in ("checkpoint_best.pt", "recipe.json"):
        shutil.copy(out / "baseline" / name, tmp_path / name)
    r = run_script(
        os.path.join(RECIPES, "iwslt14", "eval.sh"),
        str(tmp_path / "checkpoint_best.pt"),
        "--",
        "--model-overrides",
        "{'rank_scale': 0.5}",
    )
    assert r.returncode == 2
    line = last_line(r.stderr)
    assert line.startswith("eval.sh: error: fairseq-generate failed: ValueError: checkpoint does not match")
    assert not glob.glob(str(tmp_path / "*.results.json")) and not glob.glob(str(tmp_path / "*.hyp.txt"))


def test_sweep_smoke_draws_both_panels_and_resumes(demo, tmp_path):
    """sweep.sh --smoke on the demo's prepared corpus: 10 runs (the top panel's baseline, WD, FD-OV, FD-QK+OV and
    the bottom panel's {WD, FD} x {SI, no SI} at rank scale 0.5; coefficients 0 and 1e-4), each evaluated on valid
    and test; both PNGs open as images, the table has every grid point; a second sweep over two finished runs,
    spread over two (simulated) GPUs, trains and evaluates nothing again."""
    from matplotlib import image

    out_dir, _ = demo
    fig = tmp_path / "fig4"
    sweep = os.path.join(RECIPES, "iwslt14", "sweep.sh")
    r = run_script(sweep, "--smoke", "--data", str(out_dir / "data"), "--out", str(fig))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Figure 4 grid (smoke): 10 runs" in r.stdout and "10/10" in r.stdout
    for name in ("fig4_top.png", "fig4_bottom.png"):
        assert is_png(fig / name)
        pixels = image.imread(str(fig / name))
        assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 0
    table = (fig / "fig4.md").read_text()
    value = r"\d+\.\d\d ± \d+\.\d\d"
    top = [("baseline", "0")] + [(line, c) for line in ("wd", "fd-ov", "fd-qkov") for c in ("0", "0.0001")]
    for line, coef in top:
        assert re.search(rf"^\| {line} \| [^|]+ \| {coef} \| 1 \| {value} \| {value} \|", table, re.M), (line, coef)
    for line in ("wd", "fd", "wd+si", "fd+si"):
        for coef in ("0", "0.0001"):
            assert re.search(
                rf"^\| {re.escape(line)} \| [^|]+ \| 0\.5 \| {coef} \| 1 \| {value} \| {value} \|", table, re.M
            ), (line, coef)
        assert re.search(rf"^\| {re.escape(line)} \| 0\.5 \| (0|0\.0001) \| {value} \| {value} \|$", table, re.M)
    assert "Missing results" not in table and "beam 2" in table
    runs = glob.glob(str(fig / "*" / "*" / "*" / "seed1"))
    assert len(runs) == 10
    for run in runs:  # BLEU of the written hypotheses, recomputed
        res = {s: load_json(f"{run}/checkpoint_best.{s}.results.json") for s in ("valid", "test")}
        assert res["valid"]["subset"] == "valid" and res["test"]["subset"] == "test"
        assert load_json(f"{run}/grid.json")["grid"] == "figure4"
    # resume: two finished runs again, one per simulated GPU: nothing trained or evaluated again
    before = {p: os.path.getmtime(p) for p in glob.glob(str(fig / "0" / "*" / "*" / "seed1" / "checkpoint_best*"))}
    r = run_script(
        sweep,
        "--smoke",
        "--data",
        str(out_dir / "data"),
        "--out",
        str(fig),
        "--only",
        "fd-ov",
        "--scales",
        "0",
        "--gpus",
        "0,1",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert ": 2 runs (" in r.stdout and len(re.findall(r"\(GPU [01]\): done", r.stdout)) == 2
    log = (fig / "0" / "fd-ov" / "0.0001" / "seed1" / "sweep.log").read_text()
    assert "already trained" in log and "CUDA_VISIBLE_DEVICES=" in log and "results newer than" in log
    assert {p: os.path.getmtime(p) for p in before} == before

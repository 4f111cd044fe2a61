"""Recipe helpers: the SQuAD v1.1 metric against hand-checked cases, the synthetic corpora, raw-corpus checks and
cleaning, BLEU scoring of fairseq-generate output, the summary table/plot, the scripts' options and errors.
(End-to-end smoke runs of every recipe: tests/test_recipes_smoke.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest
import torch

from fnl_transformers.recipes import fairseq_eval, summary, synthetic, textprep
from fnl_transformers.recipes.squad_metric import evaluate, exact_match, f1, max_over_truths, normalize_answer

from recipes_helpers import RECIPES, is_png, last_line, load_json, run_script

TRAIN = os.path.join(RECIPES, "iwslt14", "train.sh")
PREPARE = os.path.join(RECIPES, "iwslt14", "prepare.sh")
EVAL = os.path.join(RECIPES, "iwslt14", "eval.sh")


# ------------------------------------------------------------------------------ SQuAD v1.1 metric, by hand
@pytest.mark.parametrize(
    "text, normalized",
    [
        ("Paris", "paris"),  # lower case
        ("PARIS", "paris"),
        ("Paris!", "paris"),  # ASCII punctuation removed
        ("U.S.A.", "usa"),  # ... without leaving a space
        ("state-of-the-art", "stateoftheart"),  # hyphens too; 'the' is then inside a word, kept
        ("(1,000)", "1000"),
        ("Paris\u2026", "paris\u2026"),  # non-ASCII punctuation (ellipsis) is NOT removed
        ("The Eiffel Tower", "eiffel tower"),  # articles a / an / the as whole words
        ("an apple a day", "apple day"),
        ("theater banana", "theater banana"),  # ... not inside words
        ("the.", ""),  # punctuation first, then the article goes
        ("a.b", "ab"),  # punctuation first: 'ab' is no article
        ("  New \t York \n", "new york"),  # whitespace collapsed
        ("The  Beatles ,  a band", "beatles band"),
    ],
)
def test_normalize_answer_rules(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_hand_values():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    # 'the big red dog' -> [big, red, dog]; 'a red dog' -> [red, dog]: 2 shared, P = 2/3, R = 1, F1 = 0.8
    assert f1("the big red dog", "a red dog") == pytest.approx(0.8, abs=1e-12)
    # repeated tokens count by multiplicity: P = 1/2, R = 1 -> 2/3
    assert f1("dog dog", "dog") == pytest.approx(2 / 3, abs=1e-12)
    assert f1("cat", "dog") == 0.0
    # the official quirk: both normalize to '' -> EM 1 but F1 0 (no shared token)
    assert exact_match("The", "a") == 1.0 and f1("The", "a") == 0.0
    # 'Denver Broncos' vs '1,000 Denver Broncos.': P = 1, R = 2/3 -> 0.8
    assert f1("Denver Broncos", "1,000 Denver Broncos.") == pytest.approx(0.8, abs=1e-12)


def test_max_over_ground_truths():
    truths = ["Denver Broncos", "The Denver Broncos", "Broncos"]
    assert max_over_truths(exact_match, "the denver broncos", truths) == 1.0
    # 'broncos team' vs 'denver broncos': P = R = 1/2 -> 0.5; vs 'broncos': P = 1/2, R = 1 -> 2/3: max 2/3
    assert max_over_truths(f1, "Broncos team", ["Denver Broncos", "Broncos"]) == pytest.approx(2 / 3, abs=1e-12)
    assert max_over_truths(exact_match, "Broncos team", ["Denver Broncos", "Broncos"]) == 0.0
    with pytest.raises(ValueError, match="no ground-truth answer"):
        max_over_truths(f1, "x", [])


def test_evaluate_dataset_percentages_and_unanswered():
    data = [
        {
            "paragraphs": [
                {
                    "context": "...",
                    "qas": [
                        {"id": "a", "answers": [{"text": "Denver Broncos"}, {"text": "Broncos"}]},
                        {"id": "b", "answers": [{"text": "a red dog"}]},
                        {"id": "c", "answers": [{"text": "1999"}]},
                    ],
                }
            ]
        }
    ]
    preds = {"a": "Broncos", "b": "the big red dog"}  # 'c' unanswered: scores 0, is counted
    r = evaluate(data, preds)
    assert r["questions"] == 3 and r["unanswered"] == 1
    assert r["exact_match"] == pytest.approx(100 * 1 / 3, abs=1e-9)
    assert r["f1"] == pytest.approx(100 * (1 + 0.8) / 3, abs=1e-9)


# ------------------------------------------------------------------------------ synthetic data
def test_toy_language_pair_is_a_lexicon_mapping_with_local_reordering(tmp_path):
    pair = synthetic.ToyLanguagePair(seed=3)
    src2tgt = {s: t for pos in synthetic.POS_SIZES for s, t in zip(pair.src[pos], pair.tgt[pos])}
    assert len(set(src2tgt.values())) == len(src2tgt)  # a bijection onto disjoint target words
    assert not set(src2tgt) & set(src2tgt.values())
    counts = synthetic.write_parallel(str(tmp_path), "xx", "yy", sizes=(200, 20, 20), seed=3)
    assert counts == {"train": 200, "valid": 20, "test": 20}
    src = {s: open(tmp_path / f"{s}.xx").read().splitlines() for s in synthetic.SPLITS}
    tgt = {s: open(tmp_path / f"{s}.yy").read().splitlines() for s in synthetic.SPLITS}
    assert not set(src["test"]) & set(src["train"])  # test sentences never seen in training
    pos_of = {w: pos for pos in synthetic.POS_SIZES for w in pair.src[pos]}
    for s, t in zip(src["train"], tgt["train"]):
        sw, tw = s[:-1].lower().split(), t[:-1].lower().split()
        assert s.endswith(".") and t.endswith(".") and s[0].isupper()
        assert sorted(src2tgt[w] for w in sw) == sorted(tw)  # word-by-word mapping ...
        # ... with reordering: ADJ* NOUN -> NOUN ADJ* (reversed), VERB ADV -> ADV VERB
        expected, i = [], 0
        while i < len(sw):
            if pos_of[sw[i]] == "adj":
                j = i
                while pos_of[sw[j]] == "adj":
                    j += 1
                expected += [src2tgt[sw[j]]] + [src2tgt[w] for w in reversed(sw[i:j])]
                i = j + 1
            elif pos_of[sw[i]] == "verb" and i + 1 < len(sw) and pos_of[sw[i + 1]] == "adv":
                expected += [src2tgt[sw[i + 1]], src2tgt[sw[i]]]
                i += 2
            else:
                expected.append(src2tgt[sw[i]])
                i += 1
        assert expected == tw
    again = tmp_path / "again"
    synthetic.write_parallel(str(again), "xx", "yy", sizes=(200, 20, 20), seed=3)
    assert open(again / "train.yy").read() == open(tmp_path / "train.yy").read()  # deterministic


def test_synthetic_squad_answers_are_exact_spans():
    data = synthetic.squad_examples(30, seed=5)
    n = 0
    for p in data["data"][0]["paragraphs"]:
        for qa in p["qas"]:
            a = qa["answers"][0]
            assert p["context"][a["answer_start"] : a["answer_start"] + len(a["text"])] == a["text"]
            n += 1
    assert n == 90


# ------------------------------------------------------------------------------ raw corpus checks and cleaning
def _raw(tmp_path, lines=("Hallo Welt .", "Guten Tag ."), tgt_lines=("Hello world .", "Good day .")):
    d = tmp_path / "raw"
    d.mkdir(exist_ok=True)
    for split in textprep.SPLITS:
        (d / f"{split}.de").write_text("\n".join(lines) + "\n")
        (d / f"{split}.en").write_text("\n".join(tgt_lines) + "\n")
    return d


def test_check_raw_dir_errors(tmp_path):
    d = _raw(tmp_path)
    assert textprep.check_raw_dir(str(d), "de", "en") == {"train": 2, "valid": 2, "test": 2}
    (d / "valid.en").write_text("Hello world .\n")
    with pytest.raises(textprep.PrepError, match=r"mismatched line counts in split 'valid'.*has 2 lines but .* has 1"):
        textprep.check_raw_dir(str(d), "de", "en")
    (d / "valid.en").write_text("")
    with pytest.raises(textprep.PrepError, match=r"empty file .*valid\.en"):
        textprep.check_raw_dir(str(d), "de", "en")
    (d / "valid.en").unlink()
    with pytest.raises(textprep.PrepError, match=r"missing file .*valid\.en.*\{train,valid,test\}\.\{de,en\}"):
        textprep.check_raw_dir(str(d), "de", "en")
    with pytest.raises(textprep.PrepError, match="both 'de'"):
        textprep.check_raw_dir(str(d), "de", "de")


def test_count_lines_without_final_newline(tmp_path):
    p = tmp_path / "x"
    p.write_text("a\nb")
    assert textprep.count_lines(str(p)) == 2


def test_clean_split_filters_train_and_reports_counts():
    src = ["a b c", "", "w " * 200, "one", "x  y\u200b z", "q"]
    tgt = ["A B C", "x", "W", "one two three four", "X Y Z", "Q"]
    kept, removed = textprep.clean_split(src, tgt, max_len=175, ratio=1.5, keep_all=False)
    assert kept == [("a b c", "A B C"), ("x y z", "X Y Z"), ("q", "Q")]
    assert removed == {"empty": 1, "longer than 175 words": 1, "length ratio above 1.5": 1}


def test_clean_split_never_drops_test_pairs():
    kept, _ = textprep.clean_split(["w " * 300, "a"], ["x", "b c d e"], max_len=175, ratio=1.5, keep_all=True)
    assert len(kept) == 2
    with pytest.raises(textprep.PrepError, match="test line 2 is empty"):
        textprep.clean_split(["a", " "], ["b", "c"], max_len=175, ratio=1.5, keep_all=True)


def test_extract_iwslt_layout(tmp_path):
    """The official archive's layout: tagged train files, XML dev/test sets; fairseq's split (every 23rd = valid)."""
    base = tmp_path / "orig" / "de-en"
    base.mkdir(parents=True)
    for lang, word in (("de", "Satz"), ("en", "sentence")):
        lines = ["<url>http://x</url>", "<keywords>k</keywords>", "<talkid>1</talkid>", "<title>Titel</title>"]
        lines += [f"{word} {i}" for i in range(1, 47)]
        (base / f"train.tags.de-en.{lang}").write_text("\n".join(lines) + "\n")
        for part in textprep._TEST_PARTS:
            segs = "\n".join(f'<seg id="{i}"> {part} {lang} {i} it\u2019s </seg>' for i in range(1, 3))
            (base / f"{part}.de-en.{lang}.xml").write_text(f'<refset>\n<doc docid="1">\n{segs}\n</doc>\n</refset>\n')
    counts = textprep.extract_iwslt(str(tmp_path / "orig"), str(tmp_path / "raw"), "de", "en")
    # 47 text lines (the title's text stays, tags go): lines 23 and 46 are valid, 5 test parts x 2 segments
    assert counts == {"train": 45, "valid": 2, "test": 10}
    valid = (tmp_path / "raw" / "valid.en").read_text().splitlines()
    assert valid == ["sentence 22", "sentence 45"]
    test = (tmp_path / "raw" / "test.en").read_text().splitlines()
    assert test[0] == "IWSLT14.TED.dev2010 en 1 it's" and len(test) == 10


# ------------------------------------------------------------------------------ BLEU of fairseq-generate output
def test_read_hypotheses_orders_by_id_and_scores_with_sacrebleu(tmp_path):
    import sacrebleu

    gen = tmp_path / "gen.txt"
    gen.write_text(
        "S-1\tsrc b\nH-1\t-0.1\tb hyp\nD-1\t-0.1\tthe cat sat on the mat.\n"
        "S-0\tsrc a\nD-0\t-0.2\tHello world!\nD-0\t-0.9\tsecond best\n"
    )
    hyps = fairseq_eval.read_hypotheses(str(gen))
    assert hyps == ["Hello world!", "the cat sat on the mat."]
    refs = ["Hello world!", "the cat sat on a mat."]
    score, sig, _ = fairseq_eval.bleu(hyps, refs)
    assert score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert "tok:13a" in sig and "case:mixed" in sig
    assert fairseq_eval.bleu(refs, refs)[0] == pytest.approx(100.0)
    with pytest.raises(fairseq_eval.EvalError, match="2 hypotheses but 1 references"):
        fairseq_eval.bleu(hyps, refs[:1])
    gen.write_text("D-0\t-0.1\ta\nD-2\t-0.1\tc\n")
    with pytest.raises(fairseq_eval.EvalError, match=r"lacks hypotheses for sentence ids \[1\]"):
        fairseq_eval.read_hypotheses(str(gen))
    gen.write_text("Traceback ...\n")
    with pytest.raises(fairseq_eval.EvalError, match="no 'D-<id>'"):
        fairseq_eval.read_hypotheses(str(gen))


# ------------------------------------------------------------------------------ summary table and plot
def _result(path, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(kw, f)


def test_summary_table_and_plot(tmp_path):
    runs = tmp_path / "runs"
    _result(
        str(runs / "base" / "checkpoint_best.test.results.json"),
        metric="bleu",
        score=30.5,
        variant="baseline",
        params=1000,
        coef=0.0,
        regularizer="none",
        updates=10,
        sacrebleu_signature="nrefs:1|tok:13a",
    )
    _result(
        str(runs / "fd1" / "checkpoint_best.test.results.json"),
        metric="bleu",
        score=31.25,
        variant="fd-ov",
        params=1000,
        coef=1e-5,
        regularizer="fd",
        updates=10,
    )
    _result(
        str(runs / "fd2" / "checkpoint_best.test.results.json"),
        metric="bleu",
        score=29.0,
        variant="fd-ov",
        params=1000,
        coef=1e-4,
        regularizer="fd",
        updates=10,
    )
    _result(str(tmp_path / "mlm.eval.results.json"), metric="mlm_loss", score=2.5, variant="lamb-full", params=50)
    _result(
        str(tmp_path / "mlm2" / "mlm.eval.results.json"), metric="mlm_loss", score=2.0, variant="flambe-full", params=50
    )
    out = summary.summarize(
        [str(runs), str(tmp_path / "mlm.eval.results.json"), str(tmp_path / "mlm2")], str(tmp_path / "sum")
    )
    text = open(out["table"]).read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    # best first: BLEU descending, MLM loss ascending; a run is named by its directory
    assert [r.split("|")[1].strip() for r in rows] == ["fd1", "base", "fd2", "mlm2", tmp_path.name]
    assert "| fd1 | fd-ov | 31.25 | 1,000 | fd | 1e-05 |" in text
    assert "sacrebleu signature: `nrefs:1|tok:13a`" in text
    assert is_png(out["plot"])
    with pytest.raises(FileNotFoundError, match="no such results"):
        summary.summarize([str(tmp_path / "nothere")], str(tmp_path / "sum2"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.results\.json"):
        summary.summarize([str(tmp_path / "sum")], str(tmp_path / "sum2"))


# ------------------------------------------------------------------------------ scripts: options and errors
PAPER = [
    "--optimizer nag",
    "--lr 0.25",
    "--lr-scheduler inverse_sqrt",
    "--warmup-init-lr 0.25",
    "--warmup-updates 4000",
    "--clip-norm 0.1",
    "--dropout 0.2",
    "--max-tokens 4000",
    "--label-smoothing 0.1",
    "--max-update 100000",
    "--arch fnl_transformer_small",
    "--factor-init dense",
    "--reduced-heads fresh",
]
ONE_KNOB = "--factorize ffn,embedding,position,attention"
VARIANT_FLAGS = {
    "baseline": ["--criterion label_smoothed_cross_entropy"],
    "wd": ["--criterion label_smoothed_cross_entropy", "--weight-decay 1e-4"],
    "fd-ov": ["--criterion fd_label_smoothed_cross_entropy", "--fd-ov 1e-4"],
    "fd-qkov": ["--fd-qk 1e-4", "--fd-ov 1e-4"],
    "lowrank-si-fd": [
        "--rank-scale 0.5",
        ONE_KNOB,
        "--spectral-init",
        "--spectral-init-qk",
        "--spectral-init-ov",
        "--fd-linear 1e-4",
        "--fd-qk 1e-4",
        "--fd-ov 1e-4",
    ],
    "lowrank-nosi": [
        "--rank-scale 0.5",
        ONE_KNOB,
        "--fd-linear 1e-4",
        "--no-spectral-init",
        "--no-spectral-init-qk",
        "--no-spectral-init-ov",
    ],
    "head-dim-half": ["--head-dim 32", "--spectral-init-qk", "--spectral-init-ov", "--fd-ov 1e-4"],
}


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "bin"
    d.mkdir()
    for lang in ("de", "en"):
        (d / f"dict.{lang}.txt").write_text("a 1\n")
    return str(d)


def _dry(variant, data, *args):
    r = run_script(TRAIN, variant, "--data", data, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


OVERRIDES = (
    "--coef",
    "5e-6",
    "--rank-scale",
    "0.25",
    "--lr",
    "0.5",
    "--max-update",
    "77",
    "--seed",
    "3",
    "--warmup-updates",
    "10",
    "--max-tokens",
    "999",
    "--dropout",
    "0.3",
    "--clip-norm",
    "0",
    "--rules",
    "library",
    "--",
    "--fd-qk",
    "0",
)


@pytest.fixture(scope="module")
def dry_runs(fake_data):
    """train.sh --dry-run of every variant, paper and smoke settings, and one with every override (2 at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {(v, smoke): (v, fake_data, *(["--smoke"] if smoke else [])) for v in VARIANT_FLAGS for smoke in (0, 1)}
    jobs["overrides"] = ("lowrank-si-fd", fake_data, *OVERRIDES)
    jobs["6-layer"] = ("wd", fake_data, "--arch", "fnl_transformer_iwslt_de_en", "--rank-scale", "0.5", "--no-si")
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(jobs, pool.map(lambda a: _dry(*a), jobs.values())))
    return results


@pytest.mark.parametrize("variant", sorted(VARIANT_FLAGS))
def test_train_variants_use_the_paper_setting(variant, dry_runs):
    cmd = " ".join(shlex.split(dry_runs[(variant, 0)]))
    for flag in PAPER + VARIANT_FLAGS[variant]:
        assert f" {flag}" in cmd + " ", (flag, cmd)
    assert "--user-dir " in cmd and "fnl_fairseq_plugin" in cmd
    assert "--share-all-embeddings" not in cmd  # the paper's model has separate embeddings
    if variant in ("baseline", "wd", "fd-ov", "fd-qkov"):
        assert "--rank-scale" not in cmd and "--spectral-init" not in cmd and "--fd-linear" not in cmd
    if variant == "lowrank-nosi":
        assert " --spectral-init" not in cmd  # SI is the default: this variant turns it off


def test_train_overrides_and_fairseq_accepts_every_variant(dry_runs):
    """Every tuned option is overridable, the later '--' arguments win, and fairseq's own parser (with the plugin)
    accepts each variant's command line."""
    from fairseq import options

    cmd = shlex.split(dry_runs["overrides"])
    args = options.parse_args_and_arch(options.get_training_parser(), cmd[1:])
    assert (args.fd_linear, args.fd_ov, args.fd_qk, args.rank_scale) == (5e-6, 5e-6, 0.0, 0.25)
    assert (args.lr, args.warmup_init_lr, args.max_update, args.seed) == ([0.5], 0.5, 77, 3)
    assert (args.warmup_updates, args.max_tokens, args.dropout, args.clip_norm) == (10, 999, 0.3, 0.0)
    assert (args.factor_init, args.reduced_heads, args.factorize) == (
        "random",
        "truncate",
        "ffn,embedding,position,attention",
    )
    assert cmd[cmd.index("--save-dir") + 1] == "runs/iwslt14/lowrank-si-fd-c5e-6-r0.25-library-s3"
    for key, line in dry_runs.items():
        args = options.parse_args_and_arch(options.get_training_parser(), shlex.split(line)[1:])
        assert args.arch == ("fnl_transformer_iwslt_de_en" if key == "6-layer" else "fnl_transformer_small"), key
    # the 6-layer model via --arch: shared embeddings, sinusoidal positions, so no 'position' part
    cmd = " ".join(shlex.split(dry_runs["6-layer"]))
    assert "--share-all-embeddings" in cmd and "--factorize ffn,embedding,attention " in cmd
    assert "--no-spectral-init --no-spectral-init-qk --no-spectral-init-ov" in cmd and "--weight-decay 1e-4" in cmd


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "unknown variant 'nope': choose one of baseline wd fd-ov"),
        (["baseline", "--coef", "1e-4"], "baseline has no regularizer"),
        (["head-dim-half", "--rank-scale", "0.5"], "--rank-scale does not apply to head-dim-half"),
        (["lowrank-si-fd", "--no-si"], "lowrank-si-fd is the SI variant: use lowrank-nosi"),
        (["wd", "--rules", "official"], "--rules must be paper or library, got 'official'"),
        (["lowrank-si-fd", "--rank-scale", "0"], "--rank-scale must be > 0"),
        (["lowrank-si-fd", "--rank-scale", "abc"], "--rank-scale must be a non-negative number, got 'abc'"),
        (["wd", "--max-update", "0"], "--max-update must be >= 1"),
        (["wd", "--seed"], "--seed needs a value"),
        (["wd", "--bogus"], "unknown option '--bogus'"),
        (["wd", "--head-dim", "8"], "--head-dim applies to the head-dim-half variant"),
    ],
)
def test_train_bad_input(args, message, fake_data):
    r = run_script(TRAIN, *args, "--data", fake_data, "--dry-run")
    assert r.returncode == 2
    assert message in last_line(r.stderr) and last_line(r.stderr).startswith("train.sh: error: ")


def test_train_missing_data(tmp_path):
    r = run_script(TRAIN, "baseline", "--data", str(tmp_path / "none"), "--dry-run")
    assert r.returncode == 2 and "no prepared data in" in r.stderr and "prepare.sh" in r.stderr


def test_eval_bad_input(tmp_path):
    r = run_script(EVAL, str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and last_line(r.stderr).startswith("eval.sh: error: checkpoint not found")
    r = run_script(EVAL, str(tmp_path))
    assert r.returncode == 2 and "no checkpoint_best.pt, checkpoint_last.pt or checkpoint_init.pt" in r.stderr
    (tmp_path / "c.pt").write_bytes(b"x")
    r = run_script(EVAL, str(tmp_path / "c.pt"))
    assert r.returncode == 2 and last_line(r.stderr) == (
        f"eval.sh: error: {tmp_path / 'c.pt'} is a text file, not a PyTorch checkpoint; give a checkpoint_*.pt "
        "written by fairseq-train (e.g. checkpoints/checkpoint_best.pt)"
    )
    torch.save({"weights": torch.zeros(2)}, str(tmp_path / "c.pt"))  # a PyTorch file, not a fairseq checkpoint
    r = run_script(EVAL, str(tmp_path / "c.pt"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "is a PyTorch file but not a fairseq checkpoint: it holds a dict with keys 'weights'" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # fairseq-generate never ran (no log, no output)
    torch.save({"model": {}, "cfg": None}, str(tmp_path / "c.pt"))  # shaped like one: the next check speaks
    r = run_script(EVAL, str(tmp_path / "c.pt"))
    assert r.returncode == 2 and "no recipe.json beside" in r.stderr and "--data DIR" in r.stderr
    r = run_script(EVAL, str(tmp_path / "c.pt"), "--beam", "0")
    assert r.returncode == 2 and "--beam must be a positive integer" in r.stderr


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "valid.en").unlink(), "missing file {d}/valid.en"),
        (lambda d: (d / "test.de").write_text("a\nb\nc\n"), "mismatched line counts in split 'test'"),
        (lambda d: (d / "train.en").write_text(""), "empty file {d}/train.en"),
    ],
)
def test_prepare_raw_dir_failures_leave_no_output(break_it, message, tmp_path):
    d = _raw(tmp_path)
    break_it(d)
    out = tmp_path / "out"
    r = run_script(PREPARE, "--raw-dir", str(d), "--out", str(out))
    assert r.returncode == 2
    assert last_line(r.stderr).startswith("prepare.sh: error: " + message.format(d=d).split(" {")[0])
    assert message.format(d=d) in r.stderr
    assert not out.exists()  # nothing that could look like a prepared corpus


def test_prepare_option_errors(tmp_path):
    d = _raw(tmp_path)
    for args, message in (
        (["--raw-dir", str(d), "--smoke"], "give --raw-dir or --smoke, not both"),
        (["--smoke", "--vocab-size", "abc"], "--vocab-size must be a positive integer"),
        (["--raw-dir", str(tmp_path / "nope")], "is not a directory"),
        (["--src", "fr", "--tgt", "es"], "for fr-es give --raw-dir DIR"),
        (["--spm-model-type", "char"], "--spm-model-type must be bpe or unigram"),
    ):
        r = run_script(PREPARE, *args, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and message in last_line(r.stderr), (args, r.stderr)


def test_largest_trainable_vocabulary_is_verified():
    """sentencepiece's suggested bound is tried first; when it fails too, the largest size that trains is found by
    bisection (a stand-in trainer that accepts sizes up to 37)."""
    tried = []

    def train(size, prefix):
        tried.append(size)
        if size > 37:
            raise RuntimeError("Vocabulary size is smaller than required_chars")

    assert textprep._largest_trainable(train, 100, "/nonexistent/p") == 37
    assert tried[:2] == [100, 8]
    assert textprep._largest_trainable(lambda size, prefix: None, 100, "/nonexistent/p") == 100

    def never(size, prefix):
        raise RuntimeError("no")

    assert textprep._largest_trainable(never, 100, "/nonexistent/p") == 0


@pytest.mark.slow
def test_prepare_suggested_vocabulary_works_on_the_rerun(tmp_path):
    """A tiny corpus: the default vocabulary is too large; the suggested size works when rerun on the same --out
    (the failed run recorded no settings to refuse it with)."""
    import random
    import re

    rng = random.Random(0)
    words = [("haus", "house"), ("katze", "cat"), ("hund", "dog"), ("baum", "tree"), ("buch", "book")]
    d = tmp_path / "raw"
    d.mkdir()
    for split, n in (("train", 40), ("valid", 5), ("test", 5)):
        pairs = [[rng.choice(words) for _ in range(rng.randint(2, 6))] for _ in range(n)]
        (d / f"{split}.de").write_text("".join(" ".join(w for w, _ in p) + "\n" for p in pairs))
        (d / f"{split}.en").write_text("".join(" ".join(w for _, w in p) + "\n" for p in pairs))
    out = tmp_path / "out"
    r = run_script(PREPARE, "--raw-dir", str(d), "--out", str(out))
    m = re.search(
        r"--vocab-size 10000 is too large for this training corpus: pass --vocab-size (\d+) or less",
        last_line(r.stderr),
    )
    assert r.returncode == 2 and m, r.stderr
    assert not (out / "settings.txt").exists()
    r = run_script(PREPARE, "--raw-dir", str(d), "--out", str(out), "--vocab-size", m.group(1))
    assert r.returncode == 0, r.stderr
    assert "discarding an unfinished preparation" in r.stdout
    assert load_json(out / "bin" / "fnl_prepare.json")["vocab_size"] == int(m.group(1))
    assert (out / "settings.txt").read_text().split()[3] == f"vocab={m.group(1)}"
    r = run_script(PREPARE, "--raw-dir", str(d), "--out", str(out), "--vocab-size", "50")
    assert r.returncode == 2 and "was prepared with other settings" in last_line(r.stderr)


def test_summary_cli_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "fnl_transformers.recipes.summary", str(tmp_path), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no *.results.json under" in r.stderr


# ------------------------------------------------------------------------------ Figure 4: the sweep and its panels
SWEEP = os.path.join(RECIPES, "iwslt14", "sweep.sh")
# the official grid, typed from make.py (transformer_settings, trials=3), not imported from the code under test
MAKE_DENSE = [0.0, 1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3]
MAKE_COMPRESSED = [0.0, 1e-6, 5e-6, 1e-5, 5e-5, 1e-4]
MAKE_SCALES, MAKE_SEEDS = [0.25, 0.5], [1, 2, 3]


def _official_runs():
    """{run folder: train.sh arguments} of Figure 4's lines: top = baseline + {wd, fd-ov, fd-qkov} x nonzero dense
    coefficients; bottom = per scale, the coefficient-0 run with and without SI + {wd, fd-qkov} x {SI, no SI} x
    nonzero coefficients; every configuration for seeds 1, 2, 3."""
    configs = [("0/baseline/0", "baseline")]
    configs += [(f"0/{v}/{c:g}", f"{v} --coef {c:g}") for v in ("wd", "fd-ov", "fd-qkov") for c in MAKE_DENSE[1:]]
    for r in MAKE_SCALES:
        for si in ("", "+si"):
            flag = "--si" if si else "--no-si"
            configs.append((f"{r:g}/baseline{si}/0", f"baseline --rank-scale {r:g} {flag}"))
            configs += [
                (f"{r:g}/{v}{si}/{c:g}", f"{v} --coef {c:g} --rank-scale {r:g} {flag}")
                for v in ("wd", "fd-qkov")
                for c in MAKE_COMPRESSED[1:]
            ]
    return {
        f"{name}/seed{s}": args.split(" ", 1)[0] + f" --seed {s}" + (" " + args.split(" ", 1)[1] if " " in args else "")
        for name, args in configs
        for s in MAKE_SEEDS
    }


def _listed(stdout):
    """{run folder: train.sh arguments} printed by sweep.sh --dry-run."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^  (\S+/seed\d+)\s+train\.sh (.*?)\s+\[", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


SWEEP_FILTERS = [
    (("--only", "fd-ov"), (1 + 7) * 3),  # its coefficient-0 point is the dense baseline
    (("--only", "fd+si", "--scales", "0.25"), (1 + 5) * 3),
    (("--scales", "0.25", "--seeds", "1,2"), 22 * 2),
    (("--scales", "0", "--only", "wd"), (1 + 7) * 3),
    (("--smoke",), 10),
]
SWEEP_ERRORS = [
    (("--only", "fd-lin"), "--only: unknown line(s) ['fd-lin']"),
    (("--scales", "0.3"), "--scales: [0.3] not in the grid"),
    (("--seeds", "4"), "--seeds: [4] not in the grid"),
    (("--seeds", "x"), "--seeds must be comma-separated integers"),
    (("--gpus", "0", "--jobs", "2"), "give --gpus (one run per GPU) or --jobs (CPU), not both"),
    (("--only", "fd-ov", "--scales", "0.5"), "the filters leave no run"),
]


def _sweep_dry_run(args, monkeypatch, capsys):
    """``sweep.sh --dry-run ARGS`` in this process (the script only runs this module): (exit code, out, err)."""
    from fnl_transformers.recipes import sweep

    monkeypatch.setenv("FNL_PROG", "sweep.sh")
    code = sweep.main(["--dry-run", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_sweep_dry_run_lists_exactly_the_official_grid():
    size = (1 + 3 * (len(MAKE_DENSE) - 1) + len(MAKE_SCALES) * (2 + 4 * (len(MAKE_COMPRESSED) - 1))) * len(MAKE_SEEDS)
    r = run_script(SWEEP, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"{size} runs (66 configurations x seeds [1, 2, 3])" in r.stdout and size == 198
    assert _listed(r.stdout) == _official_runs()
    # no GPU measurement here: the official budget, labelled as such
    assert (
        f"estimated GPU hours: {size * 4:.1f} (not measured: the official code's own budget of 240 minutes" in r.stdout
    )


@pytest.mark.parametrize("args, count", SWEEP_FILTERS)
def test_sweep_filters(args, count, monkeypatch, capsys):
    r = _sweep_dry_run(args, monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    listed = _listed(r.stdout)
    assert len(listed) == count and f": {count} runs (" in r.stdout
    if "--smoke" not in args:
        assert set(listed.items()) <= set(_official_runs().items())


@pytest.mark.parametrize("args, message", SWEEP_ERRORS)
def test_sweep_bad_input(args, message, monkeypatch, capsys):
    r = _sweep_dry_run(args, monkeypatch, capsys)
    assert r.returncode == 2 and last_line(r.stderr).startswith("sweep.sh: error: ") and message in r.stderr


def test_sweep_gpu_hours_from_a_measured_step_time(tmp_path):
    from fnl_transformers.recipes import figure4

    runs = figure4.select(figure4.grid(), seeds=[1])
    path = tmp_path / "results-gpu.json"
    path.write_text(
        json.dumps(
            {
                "device": {"name": "H200"},
                "training": [
                    {"variant": "baseline", "precision": "float32", "s_per_update": 0.02},
                    {"variant": "fd-qkov", "precision": "float32", "s_per_update": 0.03},
                    {"variant": "fd-qkov:fp16", "precision": "fp16", "s_per_update": 0.01},
                ],
            }
        )
    )
    hours, how = figure4.gpu_hours(runs, 100_000, str(path))
    n_fd = sum(r.variant.startswith("fd") for r in runs)
    assert hours == pytest.approx((n_fd * 0.03 + (len(runs) - n_fd) * 0.02) * 100_000 / 3600, rel=1e-12)
    assert how.startswith("measured") and "H200" in how
    hours, how = figure4.gpu_hours(runs, 100_000, str(tmp_path / "none.json"))
    assert hours == pytest.approx(len(runs) * 4.0) and how.startswith("not measured")


def _grid_result(root, run, subset, bleu, beam=5):
    from fnl_transformers.recipes import figure4

    folder = os.path.join(root, run.name)
    figure4.write_grid_file(folder, run)
    _result(
        os.path.join(folder, f"checkpoint_best.{subset}.results.json"),
        metric="bleu",
        score=bleu,
        bleu=bleu,
        subset=subset,
        beam=beam,
        recipe="iwslt14",
    )


def test_figure4_panels_choose_the_coefficient_on_valid(tmp_path):
    """Hand-made results of a small grid: the bottom panel takes, per line and scale, the coefficient with the best
    mean validation BLEU even where test BLEU prefers another; means and standard deviations over seeds."""
    from fnl_transformers.recipes import figure4

    runs = figure4.grid([0.0, 1e-5], [0.0, 1e-5, 1e-4], [0.25], [1, 2])
    for run in runs:
        # valid prefers 1e-5, test prefers 1e-4 (bottom); seed 2 is 1 BLEU better than seed 1
        valid = {0.0: 20.0, 1e-5: 22.0, 1e-4: 21.0}[run.coef] + run.seed
        test = {0.0: 19.0, 1e-5: 20.0, 1e-4: 25.0}[run.coef] + run.seed + (0.5 if run.si else 0.0)
        _grid_result(str(tmp_path), run, "valid", valid)
        _grid_result(str(tmp_path), run, "test", test)
    out = summary.summarize([str(tmp_path)], str(tmp_path / "sum"))
    text = out["markdown"]
    assert {os.path.basename(p) for p in out["plots"]} == {"fig4_top.png", "fig4_bottom.png"}  # no summary.png
    for p in out["plots"]:
        assert is_png(p)
    # every grid point: top 1 baseline + 3 lines x 2 coefficients; bottom 4 lines x 3 coefficients
    rows = [line for line in text.splitlines() if line.startswith("| ") and "official" not in line]
    assert len([r for r in rows if re.match(r"\| (baseline|wd|fd-ov|fd-qkov) \| [^|]+ \| [^|]+ \| 2 \|", r)]) == 7
    assert len([r for r in rows if re.match(r"\| (wd|fd)(\+si)? \| \S+ \| 0\.25 \|", r)]) == 12
    # bottom, as plotted: coefficient 1e-05 (valid), test mean of seeds 1, 2: 20 + 1.5 (+ 0.5 with SI), std 0.71
    assert "| fd+si | 0.25 | 1e-05 | 23.50 ± 0.71 | 22.00 ± 0.71 |" in text
    assert "| wd | 0.25 | 1e-05 | 23.50 ± 0.71 | 21.50 ± 0.71 |" in text
    assert "| baseline | reglr (decay 0) | 0 | 2 | 21.50 ± 0.71 | 20.50 ± 0.71 |  |" in text
    pts = figure4.points(figure4.split_rows(summary.load(summary.find_results([str(tmp_path)])))[0])
    chosen = figure4.best_on_valid([p for p in pts if p.panel == "bottom"])
    assert {k: p.coef for k, p in chosen.items()} == {(line, 0.25): 1e-5 for line in figure4.BOTTOM_LINES}

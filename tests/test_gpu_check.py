"""``make gpu-check``: its ``--cpu-smoke`` pipeline end to end, and the README tables generated from its results.

* The smoke run (setup, the CPU cases of tests/test_gpu.py, step timings, the recipe's training command) must
  succeed and write every field the renderer and the README document; its file renders (as a table only: smoke
  results are refused as GPU numbers).
* The renderer on a synthetic ``results-gpu.json``: device, versions, times and ratios computed from the rows;
  only the text between the markers changes; the pending text when there is no file; the repository's README
  blocks are up to date with ``bench/results-gpu.json`` (pending while it does not exist).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_results() -> dict:
    rows = [
        dict(case="dense", precision="fp32", rank_scale=None, fd="none", step_s=0.040, tokens_per_s=100000.0),
        dict(
            case="dense+fd", precision="fp32", rank_scale=None, fd="qk+ov coupled", step_s=0.042, tokens_per_s=95238.1
        ),
        dict(case="rank0.5", precision="fp32", rank_scale=0.5, fd="none", step_s=0.032, tokens_per_s=125000.0),
        dict(
            case="rank0.25",
            precision="fp32",
            rank_scale=0.25,
            fd="none",
            step_s=None,
            tokens_per_s=None,
            error="RuntimeError: boom",
        ),
        dict(case="dense-fp16", precision="fp16", rank_scale=None, fd="none", step_s=0.020, tokens_per_s=200000.0),
    ]
    return {
        "schema": 1,
        "kind": "gpu-check",
        "smoke": False,
        "date": "2030-01-02 03:04 UTC",
        "device": {"name": "NVIDIA Test GPU", "type": "cuda", "count": 1, "capability": "9.0", "memory_gib": 80.0},
        "software": {
            "python": "3.12.3",
            "torch": "2.11.0",
            "cuda": "13.0",
            "transformers": "5.24.0",
            "fairseq": "0.12.3.1",
        },
        "model": {"arch": "fnl_transformer_tiny", "flags": ["--encoder-embed-dim", "256"], "max_tokens": 4000},
        "tests": {
            "command": "python -m pytest -m gpu",
            "passed": 20,
            "failed": 0,
            "skipped": 1,
            "errors": 0,
            "skip_reasons": ["tests/test_gpu.py:266: pending support"],
            "exit_code": 0,
            "seconds": 90.0,
        },
        "timings": {
            "target_tokens": 3998,
            "max_tokens": 4000,
            "data": "synthetic",
            "rows": rows,
            "fd_overhead": {"fp32": 1.05, "fp16": None},
            "lowrank_speedup": {"0.5": 1.25},
            "predicted_speedup": {"0.5": 1.4},
            "errors": {"rank0.25": "RuntimeError: boom"},
        },
        "training": [
            {
                "variant": "baseline",
                "precision": "fp32",
                "updates": 2000,
                "s_per_update": 0.036,
                "recipe_gpu_hours": 1.0,
            },
            {
                "variant": "fd-qkov",
                "precision": "fp16",
                "updates": 2000,
                "s_per_update": 0.0252,
                "recipe_gpu_hours": 0.7,
            },
            {"variant": "fd-qkov", "skipped": "time budget (480 s) used up"},
        ],
        "stages": {},
        "errors": [],
        "seconds_total": 400.0,
    }


def test_table_from_synthetic_results():
    text = gpu_report.render_table(synthetic_results())
    assert "NVIDIA Test GPU (80.0 GiB, compute capability 9.0)" in text
    assert "torch 2.11.0 (CUDA 13.0)" in text and "transformers 5.24.0" in text
    assert "20 passed, 0 failed, 1 skipped" in text
    assert "| dense, no FD | fp32 | 40.0 ms | 100,000 | baseline |" in text
    assert (
        "| dense, coupled FD on every QK and OV form | fp32 | 42.0 ms | 95,238 | 1.05x the dense step (FD "
        "overhead) |" in text
    )
    assert (
        "| FFN + embeddings at rank scale 0.5 | fp32 | 32.0 ms | 125,000 | 1.25x faster than dense "
        "(FLOP-predicted 1.40x) |" in text
    )
    assert "failed: RuntimeError: boom" in text
    assert "| baseline | fp32 | 2000 | 36.0 ms | 1.00 |" in text
    assert "| fd-qkov | fp16 | 2000 | 25.2 ms | 0.70 |" in text
    hours = gpu_report.render_hours(synthetic_results())
    assert "NVIDIA Test GPU" in hours and "baseline (fp32) 1.0 h, fd-qkov (fp16) 0.7 h" in hours


def test_pending_text_without_results():
    assert gpu_report.render_table(None) == gpu_report.PENDING_TABLE
    assert "pending" in gpu_report.PENDING_TABLE
    assert gpu_report.render_hours(None) == gpu_report.PENDING_HOURS
    assert "not measured yet" in gpu_report.PENDING_HOURS


def test_replace_block_changes_only_the_block():
    text = "intro\n<!-- gpu:start -->\nold\n<!-- gpu:end -->\noutro\n"
    new = gpu_report.replace_block(text, "<!-- gpu:start -->", "<!-- gpu:end -->", "NEW")
    assert new == "intro\n<!-- gpu:start -->\nNEW\n<!-- gpu:end -->\noutro\n"
    assert gpu_report.replace_block(new, "<!-- gpu:start -->", "<!-- gpu:end -->", "NEW") == new
    with pytest.raises(ValueError, match="markers"):
        gpu_report.replace_block("no markers", "<!-- gpu:start -->", "<!-- gpu:end -->", "x")


def test_repository_readmes_match_the_results_file():
    r = gpu_report.load()
    for path in gpu_report.BLOCKS:
        with open(path) as f:
            assert f.read() == gpu_report.rendered(path, r), f"{path}: run python -m bench.gpu_report"


def test_smoke_results_are_not_gpu_numbers(tmp_path):
    r = synthetic_results()
    r["smoke"] = True
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r))
    with pytest.raises(ValueError, match="not GPU numbers"):
        gpu_report.update_readmes(str(path))


@pytest.mark.slow
def test_cpu_smoke_pipeline_end_to_end(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["smoke"] is True and r["errors"] == []
    assert {k: v["status"] for k, v in r["stages"].items()} == {
        k: "ok" for k in ("setup", "tests", "timings", "training")
    }
    assert r["software"]["torch"] and r["software"]["fairseq"]
    t = r["tests"]
    assert t["passed"] >= 4 and t["failed"] == 0 and t["errors"] == 0
    rows = {row["case"]: row for row in r["timings"]["rows"]}
    assert set(rows) == {"dense", "dense+fd", "rank0.5", "rank0.25"}
    for row in rows.values():
        assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(r["timings"]["target_tokens"] / row["step_s"])
    assert r["timings"]["fd_overhead"]["fp32"] == pytest.approx(rows["dense+fd"]["step_s"] / rows["dense"]["step_s"])
    assert r["timings"]["predicted_speedup"]["0.5"] > 1
    trained = {(x["variant"], x["precision"]): x for x in r["training"]}
    assert set(trained) == {("fd-qkov", "fp32")}  # on a CPU fairseq's fp16 overflow handling fails: float32
    x = trained[("fd-qkov", "fp32")]
    assert x["updates"] == 20 and x["timed_updates"] >= 10 and x["s_per_update"] > 0
    assert x["command"].startswith("fairseq-train ") and "--max-tokens 256" in x["command"]
    assert "--fd-qk 1e-4" in x["command"] and "--arch fnl_transformer_small" in x["command"]
    # the renderer reads the real structure (README blocks refuse smoke results, the table itself renders)
    text = gpu_report.render_table(r)
    assert "| dense, no FD | fp32 |" in text and "| fd-qkov | fp32 | 20 |" in text
    with pytest.raises(ValueError, match="not GPU numbers"):
        gpu_report.update_readmes(str(out))

"""The `fnl` command: help, the core demo, and one clear error line for bad input."""

import subprocess
import sys

FNL = [sys.executable, "-m", "fnl_transformers.cli"]


def test_no_command_prints_help_and_exits_2():
    res = subprocess.run(FNL, capture_output=True, text=True)
    assert res.returncode == 2 and "userdir" in res.stdout and "compress" in res.stdout


def test_demo_reports_error_equal_to_tail_energy():
    res = subprocess.run(FNL + ["demo", "--rank-scales", "0.25", "1"], capture_output=True, text=True, check=True)
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith(("0.25", "1 "))]
    assert len(rows) == 2
    for row in rows:
        assert row[2] == row[3]  # relative error == tail energy, to the printed 4 digits
        assert row[4] == row[5]  # FD from Grams == FD of the dense product


def test_demo_bad_rank_scale_is_one_clear_line():
    res = subprocess.run(FNL + ["demo", "--rank-scales", "0"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "fnl demo: error: rank_scale must be a finite number > 0 (< 1 compresses, >= 1 is overcomplete), got 0.0"
    ]


def test_userdir_prints_the_shim_without_importing_fairseq():
    code = (
        "import sys; from fnl_transformers.cli import main; rc = main(['userdir']); "
        "assert rc == 0 and 'fairseq' not in sys.modules, sorted(m for m in sys.modules if 'fairseq' in m)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    path = res.stdout.strip()
    assert path.endswith("fnl_fairseq_plugin") and (__import__("os").path.isfile(path + "/__init__.py"))

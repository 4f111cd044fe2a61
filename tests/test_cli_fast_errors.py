"""Option errors of every `fnl` subcommand come before torch, transformers and fairseq are imported (checked in a
fresh interpreter through sys.modules, not by timing), as one `fnl CMD: error: ...` line; `fnl --help` reads as
whole sentences."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "fairseq")
PROBE = """
import json, sys
from fnl_transformers.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as exc:  # argparse errors
    rc = exc.code
print(json.dumps({"rc": rc, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _probe(argv):
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "src").mkdir()
    (root / "notes.txt").write_text("hello\nthis is text\n")
    return root


CASES = [
    (["compress"], "fnl compress: error: the following arguments are required"),
    (["compress", "{root}/nowhere", "{root}/out", "--rank-scale", "0.5"], "fnl compress: error: MODEL_DIR"),
    (["compress", "{root}/src", "{root}/out", "--rank-scale", "1.5"], "--rank-scale must be in (0, 1] to compress"),
    (["compress", "{root}/src", "{root}/out", "--rank-scale", "abc"], "invalid float value: 'abc'"),
    (["compress", "{root}/src", "{root}/out", "--head-dim", "0"], "--head-dim must be a positive integer"),
    (
        ["compress", "{root}/src", "{root}/out", "--target-param-ratio", "1.5"],
        "--target-param-ratio must be a number in (0, 1]",
    ),
    (
        ["compress", "{root}/src", "{root}/out", "--rank-scale", "0.5", "--head-dim", "4", "--head-dim-qk", "0"],
        "--head-dim-qk must be a positive integer",
    ),
    (
        ["compress", "{root}/src", "{root}/out", "--rank-scale", "0.5", "--factorize", "ffn,heads"],
        "unknown part(s) ['heads']",
    ),
    (["compress", "{root}/src", "{root}/out"], "nothing to compress"),
    (["inspect"], "fnl inspect: error: the following arguments are required"),
    (["inspect", "{root}/src"], "has no config.json"),
    (["recompose", "{root}/notes.txt"], "fnl recompose: error: the following arguments are required: output"),
    (["recompose", "{root}/notes.txt", "{root}/out.pt"], "notes.txt is a text file, not a PyTorch checkpoint"),
    (["recompose", "{root}/missing.pt", "{root}/out.pt"], "missing.pt does not exist"),
    (["demo", "--rank-scales", "0"], "fnl demo: error: rank_scale must be a finite number > 0"),
    (["userdir", "--bogus"], "unrecognized arguments: --bogus"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_option_errors_before_heavy_imports(dirs, argv, message):
    argv = [a.format(root=dirs) for a in argv]
    result, err = _probe(argv)
    assert result["rc"] == 2
    assert result["heavy"] == [], f"{argv} imported {result['heavy']} before reporting its error"
    assert message in err[-1], err
    assert err[-1].startswith("fnl")


def test_help_description_is_whole_sentences():
    res = subprocess.run([sys.executable, "-m", "fnl_transformers.cli", "--help"], capture_output=True, text=True)
    text = res.stdout.split("positional arguments")[0]
    description = " ".join(text.split("\n\n", 1)[1].split())
    assert description.endswith(".") and "fnl COMMAND --help" in description, description
    for name in ("demo", "userdir", "recompose", "compress", "inspect"):
        assert name in res.stdout

"""``make gpu-carry`` (``python -m bench.gpu_carry``): fill ``.gpu-carry/`` with what ``make gpu-check`` installs on
a GPU machine that has torch but no network and no fairseq.

Run it where pip reaches PyPI (inside the repository's venv: the fairseq sdist's metadata step imports torch).
It downloads, for CPython ``--python-version`` (default 3.12) on manylinux x86_64, without dependencies:

* the ``fairseq-fixed`` sdist (its Cython extensions are built on the GPU machine, in seconds);
* fairseq's dependencies that such a machine lacks: ``hydra-core``, ``omegaconf``, ``antlr4-python3-runtime``
  (published as an sdist only: built here into a pure-Python wheel) and ``bitarray`` (compiled);
* ``transformers`` recent enough for ``FNLTrainer`` (>= 5.19) whose own requirements (``huggingface-hub >= 1.31``,
  ``tokenizers < 0.24``) the machine's packages meet.

Files already present are kept; ``MANIFEST.txt`` lists each file with its size and sha256. The folder is ignored
by git and travels with the working tree (64 MiB in all); the total is printed and checked.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import subprocess
import sys
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(ROOT, ".gpu-carry")
LIMIT_MIB = 48  # leaves room for the working tree itself within the 64 MiB a device call carries

# (requirement, how): "sdist" = source archive; "build" = sdist built here into a wheel (pure Python);
# "wheel" = a binary or pure-Python wheel for the target interpreter and platform
PACKAGES: List[Tuple[str, str]] = [
    ("fairseq-fixed==0.12.3.1", "sdist"),
    ("hydra-core==1.3.2", "wheel"),
    ("omegaconf==2.3.0", "wheel"),
    ("antlr4-python3-runtime==4.9.3", "build"),
    ("bitarray==3.12.3", "wheel"),
    ("transformers==5.24.0", "wheel"),
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def _name(requirement: str) -> str:
    return requirement.split("==")[0].lower().replace("-", "_")


def _present(dest: str, requirement: str) -> List[str]:
    name, version = _name(requirement), requirement.split("==")[1]
    return [f for f in os.listdir(dest) if f.lower().replace("-", "_").startswith(f"{name}-{version}")]


def fetch(requirement: str, how: str, dest: str, python_version: str) -> None:
    pip = [sys.executable, "-m", "pip"]
    if how == "sdist":
        cmd = pip + ["download", "--no-deps", "--no-binary=:all:", "--no-build-isolation", "-d", dest, requirement]
    elif how == "build":
        cmd = pip + ["wheel", "--no-deps", "--no-binary=:all:", "-w", dest, requirement]
    else:
        cmd = pip + [
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
        ]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        cmd += ["-d", dest, requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"gpu_carry: error: could not get {requirement} ({how}):\n{(res.stdout + res.stderr)[-2000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=DEFAULT_DEST, help="output folder (default: .gpu-carry in the repository)")
    ap.add_argument("--python-version", default="3.12", help="CPython version of the GPU machine (default 3.12)")
    args = ap.parse_args(argv)
    os.makedirs(args.dest, exist_ok=True)
    for requirement, how in PACKAGES:
        if _present(args.dest, requirement):
            print(f"kept    {requirement}")
            continue
        fetch(requirement, how, args.dest, args.python_version)
        print(f"fetched {requirement}")
    files = sorted(f for f in glob.glob(os.path.join(args.dest, "*")) if not f.endswith("MANIFEST.txt"))
    total = 0
    lines = []
    for path in files:
        size = os.path.getsize(path)
        total += size
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        lines.append(f"{os.path.basename(path)}\t{size}\t{digest}")
    with open(os.path.join(args.dest, "MANIFEST.txt"), "w") as f:
        f.write(f"# for CPython {args.python_version}, manylinux x86_64; file, bytes, sha256\n")
        f.write("\n".join(lines) + "\n")
    print(f"{len(files)} files, {total / 2**20:.1f} MiB in {args.dest}")
    if total > LIMIT_MIB * 2**20:
        print(
            f"gpu_carry: error: {total / 2**20:.1f} MiB is over {LIMIT_MIB} MiB; remove stale versions from "
            f"{args.dest}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

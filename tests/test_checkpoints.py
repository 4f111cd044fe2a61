"""Checkpoint files recognized without loading them (fnl_transformers.checkpoints): formats, fairseq structure,
one clear line each, and no code from the file ever runs."""

import collections
import pickle

import pytest
import torch

from fnl_transformers import checkpoints

HINT = "give a checkpoint_*.pt written by fairseq-train (e.g. checkpoints/checkpoint_best.pt)"


class _CreatesFile:
    """Unpickling this with plain pickle creates a file (the test below checks that it never happens here)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _fairseq_like():
    return {
        "args": None,
        "cfg": {"model": None},
        "model": collections.OrderedDict(w=torch.zeros(2)),
        "optimizer_history": [{"num_updates": 3}],
        "extra_state": {},
    }


@pytest.mark.parametrize("legacy", [False, True])
def test_fairseq_checkpoint_keys_in_both_torch_formats(tmp_path, legacy):
    path = str(tmp_path / "c.pt")
    torch.save(_fairseq_like(), path, _use_new_zipfile_serialization=not legacy)
    assert checkpoints.check_fairseq_checkpoint(path) == ["args", "cfg", "model", "optimizer_history", "extra_state"]


def test_not_fairseq_checkpoints_are_one_clear_line(tmp_path):
    cases = {
        "text.pt": (lambda p: open(p, "w").write("hello\n"), f"is a text file, not a PyTorch checkpoint; {HINT}"),
        "binary.pt": (
            lambda p: open(p, "wb").write(bytes(range(250, 256)) * 10),
            "is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)",
        ),
        "dict.pt": (
            lambda p: torch.save({"a": torch.zeros(1), "b": 2}, p),
            "is a PyTorch file but not a fairseq checkpoint: it holds a dict with keys 'a', 'b', a fairseq "
            f"checkpoint has 'model' and 'cfg' (or 'args'); {HINT}",
        ),
        "state_dict.pt": (
            lambda p: torch.save(torch.nn.Linear(2, 2).state_dict(), p),
            "it holds an object (a bare state dict or module?)",
        ),
        "list.pt": (lambda p: torch.save([1, 2], p), "it holds a list"),
        "plain.pkl": (
            lambda p: open(p, "wb").write(pickle.dumps(_fairseq_like()["cfg"])),
            "a pickle, but not one torch.save wrote",
        ),
    }
    for name, (make, message) in cases.items():
        path = str(tmp_path / name)
        make(path)
        with pytest.raises(ValueError) as info:
            checkpoints.check_fairseq_checkpoint(path)
        assert message in str(info.value) and "\n" not in str(info.value), (name, str(info.value))
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pt does not exist"):
        checkpoints.check_fairseq_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="is a directory, not a checkpoint file"):
        checkpoints.check_fairseq_checkpoint(str(tmp_path))


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    torch.save(_fairseq_like(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint .*truncated or corrupted"):
        checkpoints.check_fairseq_checkpoint(str(path))


def test_reading_the_structure_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "created"
    payload = {"model": {}, "cfg": None, "extra_state": _CreatesFile(str(marker))}
    path = str(tmp_path / "bad.pt")
    torch.save(payload, path, pickle_protocol=2)
    assert checkpoints.check_fairseq_checkpoint(path) == ["model", "cfg", "extra_state"]
    assert not marker.exists()
    pickle.loads(pickle.dumps(_CreatesFile(str(marker))))  # the payload is real: plain unpickling runs it
    assert marker.exists()


def test_check_output(tmp_path):
    src = str(tmp_path / "a.pt")
    with pytest.raises(ValueError, match="must be a new file, not the input"):
        checkpoints.check_output(src, src, overwrite=True)
    (tmp_path / "b.pt").write_text("x")
    with pytest.raises(ValueError, match="already exists .*pass --force"):
        checkpoints.check_output(src, str(tmp_path / "b.pt"), overwrite=False)
    checkpoints.check_output(src, str(tmp_path / "b.pt"), overwrite=True)
    with pytest.raises(ValueError, match="is a directory; give the output file name"):
        checkpoints.check_output(src, str(tmp_path), overwrite=True)


def test_main_exit_codes(tmp_path, capsys, monkeypatch):
    good = str(tmp_path / "c.pt")
    torch.save(_fairseq_like(), good)
    assert checkpoints.main(["fairseq", good]) == 0
    monkeypatch.setenv("FNL_PROG", "eval.sh")
    (tmp_path / "t.pt").write_text("x")
    assert checkpoints.main(["fairseq", str(tmp_path / "t.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"eval.sh: error: {tmp_path / 't.pt'} is a text file")
    assert checkpoints.main(["other"]) == 2

"""ARCHITECTURE.md against the code: every module named, the settings table equal to the fairseq parser's fnl flags,
the FNLConfig fields and the core fields' help; the layering (core <- optim <- fairseq_plugin / hf <- recipes);
no private name (``_x``) of another package imported or used."""

import argparse
import ast
import dataclasses
import pathlib
import re

import pytest

from fnl_transformers.core import flat_settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fnl_transformers"
DOC = (ROOT / "ARCHITECTURE.md").read_text()


def _modules():
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


def test_every_module_is_named():
    missing = [m for m in _modules() if f"`{m}`" not in DOC and f" {m}" not in DOC and f"`{m}" not in DOC]
    assert not missing, f"ARCHITECTURE.md does not name {missing}"


def _settings_table():
    section = DOC.split("## Settings: one table for both integrations", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    out = []
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        flags = re.findall(r"--[a-z-]+", cells[0])
        field = cells[1].strip("`")
        core = cells[2]
        out.append((flags, field, core, cells[3]))
    return out


def _fnl_flags():
    pytest.importorskip("fairseq")
    from fnl_transformers.fairseq_plugin.model import add_fnl_args

    parser = argparse.ArgumentParser()
    add_fnl_args(parser)
    return {opt for action in parser._actions for opt in action.option_strings if opt not in ("-h", "--help")}


def test_settings_table_matches_the_parser_the_dataclass_and_the_core():
    from fnl_transformers.hf import FNLConfig

    table = _settings_table()
    assert {f for flags, _, _, _ in table for f in flags} == _fnl_flags()
    assert [field for _, field, _, _ in table] == [f.name for f in dataclasses.fields(FNLConfig)]
    settings = {s.name: s for s in flat_settings()}
    for flags, field, core, meaning in table:
        s = settings[field]
        assert flags[0] == "--" + field.replace("_", "-")
        assert meaning == s.help, field
        assert (f"`{s.spec}.{s.field}`" == core) if s.spec else core.startswith("—"), field


def _imports(path: pathlib.Path):
    """``(resolved module, imported names, node)`` for every import of a module of this package."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            yield module, [a.name for a in node.names], node
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node


def _area(module: str):
    parts = module.split(".")
    if parts[0] != "fnl_transformers":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ("core", "optim", "fairseq_plugin", "hf", "recipes") else "top"


ALLOWED = {
    "core": {"core"},
    "optim": {"core", "optim"},
    "fairseq_plugin": {"core", "optim", "fairseq_plugin"},
    "hf": {"core", "optim", "hf"},
    "recipes": {"core", "optim", "fairseq_plugin", "hf", "recipes", "top"},
}


def _sources():
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))


def test_layering():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        own = _area(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for module, names, node in _imports(path):
            area = _area(module)
            targets = {area} | {_area(f"{module}.{n}") for n in names if module == "fnl_transformers"}
            for target in targets - {None, "top"}:
                if own in ALLOWED and target not in ALLOWED[own]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ({own}) imports {module} ({target})")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_packages():
    """``from <other package> import _x``, ``import <other package>._m``, and ``<other package module>._x``."""
    bad = []
    for path in _sources():
        own = _area(".".join(path.relative_to(ROOT).with_suffix("").parts))
        aliases = {}
        for module, names, node in _imports(path):
            area = _area(module)
            if area is None or area == own:
                continue
            private_module = any(part.startswith("_") and part != "__init__" for part in module.split("."))
            private_names = [n for n in names if n.startswith("_")]
            if private_module or private_names:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module} {private_names or ''}")
            if isinstance(node, ast.ImportFrom):
                aliases.update({(a.asname or a.name): f"{module}.{a.name}" for a in node.names})
            else:
                aliases.update({(a.asname or a.name.split(".")[0]): a.name for a in node.names})
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.value.id in aliases
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)

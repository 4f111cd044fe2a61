"""The ``fnl`` command: tools for factorized transformers (spectral initialization, Frobenius decay).

Each subcommand's module is imported only when that subcommand runs and imports nothing heavy itself: options are
checked before torch, transformers or fairseq load (``fnl userdir`` never loads any of them, ``fnl compress``
never loads fairseq).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, help); each module defines add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": ("fnl_transformers.demo", "run the built-in demonstration"),
    "userdir": ("fnl_transformers.userdir", "print the path to pass to fairseq --user-dir"),
    "recompose": (
        "fnl_transformers.commands.recompose",
        "multiply out a fnl_transformer checkpoint into a stock fairseq transformer checkpoint",
    ),
    "compress": ("fnl_transformers.commands.compress", "SI-compress a HuggingFace model and save it"),
    "inspect": ("fnl_transformers.commands.inspect", "print ranks, parameters and errors of a saved model"),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fnl",
        description="Spectral initialization and Frobenius decay for factorized transformers "
        "(Khodak et al., ICLR 2021): compress, inspect and recompose models. Run 'fnl COMMAND --help' for a command's "
        "options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else list(argv)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the module of the command being run
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            modules[name] = module
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # one clear line, no traceback, for bad input
        print(f"fnl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

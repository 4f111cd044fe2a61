"""``fnl userdir``: print the folder to pass to ``fairseq-train --user-dir`` (and -generate, -interactive, ...).

The folder is ``fnl_transformers/fairseq_plugin/user_dir/fnl_fairseq_plugin``, a shim package that only imports
``fnl_transformers.fairseq_plugin`` (fairseq imports a user dir by its basename, which must be unique). This
module lives outside ``fairseq_plugin`` so that the command imports neither fairseq nor the plugin (fast).
"""

from __future__ import annotations

import os


def user_dir_path() -> str:
    """Absolute path of the shim package fairseq's ``--user-dir`` should import."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "fairseq_plugin", "user_dir", "fnl_fairseq_plugin")


def add_arguments(parser) -> None:
    parser.description = __doc__.splitlines()[0]


def run(args) -> int:
    path = user_dir_path()
    if not os.path.isfile(os.path.join(path, "__init__.py")):
        raise FileNotFoundError(f"the plugin folder {path} is missing; reinstall fnl_transformers")
    print(path)
    return 0

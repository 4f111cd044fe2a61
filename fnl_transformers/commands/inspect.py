"""``fnl inspect DIR``: print the per-layer table (ranks, parameters, relative approximation error at patch
time) of a model saved after ``patch_model`` / ``fnl compress``. Reads DIR/config.json only."""

from __future__ import annotations

import json
import os


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="a directory saved from a patched model (config.json with fnl_config)")


def run(args) -> int:
    path = os.path.join(args.dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{args.dir} has no config.json; give a save_pretrained directory")
    from ..hf.config import FNLConfig
    from ..hf.persist import CONFIG_KEY
    from ..hf.plan import Plan
    from ..hf.report import format_table

    with open(path) as f:
        config = json.load(f)
    plan = config.get(CONFIG_KEY)
    if not isinstance(plan, dict):
        raise ValueError(
            f"{args.dir} is not a fnl_transformers checkpoint (config.json has no {CONFIG_KEY!r}); "
            "`fnl compress` makes one"
        )
    plan = Plan.from_dict(plan)
    defaults = FNLConfig().to_dict()
    settings = {k: v for k, v in plan.config.to_dict().items() if v != defaults[k]}
    print(
        f"{args.dir}: {config.get('architectures', ['?'])[0]} patched by fnl_transformers ({plan.arch}); "
        f"settings: {json.dumps(settings)}"
    )
    print(format_table(plan))
    return 0

"""Save the untrained model of a ``fairseq-train`` command line as a checkpoint (the "no learning" contrast).

``python -m fnl_transformers.recipes.fairseq_init OUT.pt -- DATA --arch ... (fairseq-train arguments)``
builds the task, model, criterion and trainer exactly as ``fairseq-train`` does, seeded the same way, so the
weights are the training run's initialization (including spectral initialization when the options ask for it),
and saves them with fairseq's own ``Trainer.save_checkpoint`` at update 0. ``eval.sh`` scores it like any
checkpoint; its BLEU is what the demo compares trained models against.
"""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m fnl_transformers.recipes.fairseq_init OUT.pt -- FAIRSEQ_TRAIN_ARGS...", file=sys.stderr)
        return 2
    out, train_args = argv[0], argv[2:]
    import numpy as np
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, train_args)
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    np.random.seed(cfg.common.seed)  # the same seeding, in the same order, as fairseq_cli.train.main
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    trainer.consolidate_optimizer()  # as fairseq's checkpoint_utils.save_checkpoint does first
    trainer.save_checkpoint(tmp, {"untrained": True})
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"untrained checkpoint: {out} ({n:,} parameters, update 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

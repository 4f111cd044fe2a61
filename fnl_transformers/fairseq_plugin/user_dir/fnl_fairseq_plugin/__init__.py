"""fairseq ``--user-dir`` shim: importing it registers the fnl_transformers plugin (see ``fnl userdir``)."""

import fnl_transformers.fairseq_plugin  # noqa: F401  (registers models, criterion, optimizers, safe loading)

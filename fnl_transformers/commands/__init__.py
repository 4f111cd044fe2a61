"""The ``fnl`` subcommands of the heavy integrations (``compress``, ``inspect``: transformers; ``recompose``:
fairseq, which ``fnl_transformers.fairseq_plugin`` imports to register itself). Their options and inputs are
checked here, before the integration is imported, so an option error is one line in a fraction of a second."""

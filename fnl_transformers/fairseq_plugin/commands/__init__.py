"""``fnl`` subcommands of the fairseq plugin (``userdir``, ``recompose``)."""

"""Subcommands of ``fnl`` whose integration package is heavy to import (``fnl_transformers.fairseq_plugin``
imports fairseq to register itself): their argument parsing and input checks live here, so option errors appear
before fairseq loads."""

"""Holds the ``--user-dir`` shim package (see ``fnl userdir``)."""

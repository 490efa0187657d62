"""The ``ckptwise`` command line: a thin layer over the public API."""

__all__: list[str] = []

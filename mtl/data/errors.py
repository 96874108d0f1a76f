"""Errors raised when benchmark data is absent or unreadable.

Both messages are written for the person running the job: they name the files, where they
were expected, and the config key or environment variable that moves the search.
"""

from __future__ import annotations


class DatasetMissingError(FileNotFoundError):
    """Source files are not on disk (and ``data.download=false``, or downloading failed).

    The message lists the expected paths, the config key (``data.root`` or
    ``data.local.path``) and environment variable (``MTL_DATA_DIR``) that locate them, and
    why nothing was fetched: the MNIST family is fetched by default when the machine has
    internet, unless ``data.download=false``.
    """


class DatasetCorruptError(ValueError):
    """A source file exists but does not hold what its format promises (bad magic, size)."""

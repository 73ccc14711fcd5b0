"""The package version (one place: the package, the models it writes and the CLI read it)."""

__version__ = "0.1.0"

"""The package version (layer 0: every layer may read it)."""

__version__ = "0.1.0"

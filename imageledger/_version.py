"""The one place imageledger's version is written: the package metadata (pyproject.toml reads
it from here), `imageledger.__version__`, the registry User-Agent and every event's actor."""

__version__ = "0.1.0"

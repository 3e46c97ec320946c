"""HNaaS bot: platform adapters over a platform-neutral core, the SQLite queue and the generation worker."""

__version__ = "0.1.0"

"""Bundled fleets, installed as ``prefork_workers`` and registered in ``prefork.fleets``."""

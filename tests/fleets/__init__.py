"""Fleets the tests run under a real master (importable as ``fleets.*``)."""

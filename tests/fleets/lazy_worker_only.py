"""A module that imports in a worker only: in the master it raises ImportError."""

from prefork import current_worker

if current_worker() is None:
    raise ImportError("needs a worker's connection")

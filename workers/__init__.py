"""Bundled fleets, installed as ``prefork_workers`` and registered in ``prefork.fleets``.

Like any application, the bundled fleets set up their own logging at import: the
``prefork_workers`` logger writes INFO and above to stderr in prefork's line format
(prefork configures only its own logger). An application that configured the
``prefork_workers`` logger first keeps its set-up.
"""

import logging
import sys

from prefork.logs import line_formatter

_log = logging.getLogger("prefork_workers")
if not _log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(line_formatter())
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False

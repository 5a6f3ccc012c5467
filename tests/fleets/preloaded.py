"""A module for --preload: it reports its import and opens a file the floor owns."""

import os

from fleets.common import emit

FLOOR_FD = os.open(os.devnull, os.O_RDONLY)
emit("preloaded", floor_fd=FLOOR_FD)

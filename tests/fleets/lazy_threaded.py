"""A module that starts a thread when imported (a client library's background flusher)."""

import threading

_stop = threading.Event()
flusher = threading.Thread(target=_stop.wait, name="lazy-flusher", daemon=True)
flusher.start()

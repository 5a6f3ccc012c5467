"""Fleets whose workers import modules after the fork, as real applications do lazily
(a framework on its first request), and workers that abuse the import report's pipe."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker, after_fork

# Standard-library modules no test master imports itself.
STDLIB = ("xml.dom.minidom", "email.mime.text", "http.cookiejar")
# One that fails to import in the master, one that starts a thread when imported.
UNFIT = ("fleets.lazy_worker_only", "fleets.lazy_threaded")


def _importing(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)
    emit("imported", modules=list(modules))
    idle_forever()


def stdlib_worker() -> None:
    _importing(STDLIB)


def mixed_worker() -> None:
    _importing(STDLIB + UNFIT)


def many_modules_worker() -> None:
    """Puts 20000 modules with long names into sys.modules: a report far over the limit."""
    for i in range(20000):
        name = f"fake_module_with_a_rather_long_name_number_{i:05d}"
        sys.modules[name] = ModuleType(name)
    emit("imported", modules=[])
    idle_forever()


def flooding_worker() -> None:
    """Writes garbage into its report pipe itself until the master closes it; idles."""
    fd = after_fork._channel
    after_fork._channel = -1  # its own SIGURG handler then sends nothing
    try:
        os.write(fd, b"x" * 60000)  # fits the pipe: the rest blocks until the master reads
        emit("flooding")
        for _ in range(64):  # 4 MiB: a write cut short by the close returns a short count
            os.write(fd, b"x" * 65536)
    except OSError as exc:  # the master closed its end once it had had enough
        emit("flood-refused", error=exc.strerror)
    idle_forever()


def garbled_worker() -> None:
    fd = after_fork._channel
    after_fork._channel = -1
    os.write(fd, b'{"modules": 5}\n')
    os.close(fd)
    emit("garbled")
    idle_forever()


fleet = Fleet("lazy", [Worker("lazy", stdlib_worker)])
mixed = Fleet("lazy-mixed", [Worker("lazy", mixed_worker), Worker("plain", idle_forever)])
many = Fleet("lazy-many", [Worker("many", many_modules_worker)])
hostile = Fleet("lazy-hostile", [Worker("flood", flooding_worker),
                                 Worker("garbled", garbled_worker),
                                 Worker("honest", stdlib_worker)])

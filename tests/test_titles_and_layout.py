"""Process titles are read back as they are written, and the light commands stay light:
rendering a unit, asking a master for its status or importing ``prefork`` for ``Fleet``
and ``Worker`` never imports the master or a fleet's database stack."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefork import titles


@pytest.mark.parametrize(("title", "role", "fleet", "label"), [
    (titles.master("cpu"), "master", "cpu", None),
    (titles.worker("indexer.1", "app.fleet"), "worker", "app.fleet", "indexer.1"),
    # setproctitle pads to the original command line's length: the padding is not a name.
    (titles.master("sbsfleet.fleet") + " " * 47, "master", "sbsfleet.fleet", None),
])
def test_a_title_is_read_back_as_it_was_written(title: str, role: str, fleet: str,
                                                label: str | None) -> None:
    assert titles.parse(title) == (role, fleet, label)


@pytest.mark.parametrize("other", [
    "python -m prefork run --fleet cpu", "prefork: master", "prefork: worker [cpu]",
    "prefork: master extra [cpu]", "prefork: master [cpu", "",
])
def test_any_other_command_line_is_not_a_prefork_title(other: str) -> None:
    assert titles.parse(other) is None


def imported_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has after ``statement``."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("statement", [
    "import prefork",
    "from prefork import Fleet, Worker, heartbeat",
    "import prefork.unit",
    "import prefork.client",
    "import prefork.cli",  # all of `prefork status`, `reload`, `scale`, `systemd` need
])
def test_the_light_entry_points_import_neither_the_master_nor_a_database(
        statement: str) -> None:
    modules = imported_by(statement)
    assert "prefork.master" not in modules
    assert not {"sqlmodel", "sqlalchemy", "aiosqlite"} & modules


def test_the_master_is_still_there_when_asked_for() -> None:
    modules = imported_by("import prefork\nassert prefork.Master.__name__ == 'Master'")
    assert "prefork.master" in modules


def test_a_registered_fleet_without_its_extra_says_which_to_install(tmp_path: Path) -> None:
    """An entry point that names an extra (``cpu = module:fleet [cpu]``) and cannot import
    a module is one line naming the extra, as `pip install prefork` without [cpu] would
    see for the cpu fleet."""
    dist = tmp_path / "ghostfleet-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ghostfleet\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [prefork.fleets]
        ghost = ghost_fleet_module:fleet [db]
    """))
    (tmp_path / "ghost_fleet_module.py").write_text("import no_such_database_library\n")
    result = subprocess.run(
        [sys.executable, "-m", "prefork", "run", "--fleet", "ghost"], capture_output=True,
        text=True, timeout=30, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "prefork: error: fleet 'ghost' needs the packages of ghostfleet[db] (No module named "
        "'no_such_database_library'): pip install 'ghostfleet[db]'"]

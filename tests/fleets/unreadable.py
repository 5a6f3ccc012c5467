"""A fleet mapping that fails when it is read: its ``items()`` raises."""

from __future__ import annotations

from collections.abc import Iterator, Mapping


def sleeper() -> None:
    raise AssertionError("never forked: the fleet cannot be read")


class _ItemsRaise(Mapping[str, object]):
    """A mapping of one worker whose ``items()`` fails."""

    def __getitem__(self, key: str) -> object:
        return sleeper

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[str]:
        return iter(["w"])

    def items(self):  # type: ignore[override]
        raise RuntimeError("the worker table is not loaded")


fleet = _ItemsRaise()

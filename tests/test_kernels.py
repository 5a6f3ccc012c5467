"""The ``cpu`` fleet's kernels against pairwise references, and their documented semantics.

Properties run on small random inputs (hypothesis) and compare the near-linear kernels
with the O(n^2) ``naive_*`` references, or with plain grouping written out here; the
hand-written examples pin down what the words of each contract mean.
"""

from __future__ import annotations

import copy
import pickle
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_workers.cpu.kernels import (
    CREDENTIAL,
    FINGERPRINT,
    PAYLOAD,
    SOURCE,
    ComponentUpdate,
    ReuseFinding,
    attribute_sessions,
    campaigns,
    cluster_observations,
    credential_reuse,
    identities_across_sources,
    indicator_key,
    link_components,
    naive_campaigns,
    naive_credential_reuse,
    naive_link_components,
    observation_indicators,
    target_key,
)

# Small and quick: the whole project suite has a budget, and small universes of ids are
# what make items collide, merge and chain. A decorator, not a profile: profiles are global.
modest = settings(max_examples=150, deadline=None)

HOUR = 3600.0

# ------------------------------------------------------------------------ strategies

item_ids = st.lists(st.integers(0, 300), max_size=14, unique=True)
small_keys = st.lists(st.integers(0, 14), max_size=4)
maybe_small = st.none() | st.integers(0, 5)


@st.composite
def items(draw: st.DrawFn, ascending: bool = False) -> list[tuple[int, list[int]]]:
    ids = draw(item_ids)
    if ascending:
        ids.sort()
    return [(i, draw(small_keys)) for i in ids]


@st.composite
def observations(draw: st.DrawFn) -> list[tuple[int, int, int | None, int | None, int | None]]:
    ids = sorted(draw(item_ids))
    return [(i, draw(st.integers(0, 6)), draw(maybe_small), draw(maybe_small),
             draw(maybe_small)) for i in ids]


@st.composite
def sessions(draw: st.DrawFn) -> list[tuple[int, int, int | None, tuple[int, ...]]]:
    ids = sorted(draw(item_ids))
    return [(i, draw(st.integers(0, 3)), draw(maybe_small),
             tuple(draw(st.lists(st.integers(0, 8), max_size=3)))) for i in ids]


@st.composite
def batches_of(draw: st.DrawFn, rows: list[Any]) -> list[list[Any]]:
    """``rows`` (ascending ids) cut into consecutive batches, some of them empty."""
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=5)))
    bounds = [0, *cuts, len(rows)]
    return [rows[a:b] for a, b in pairwise(bounds)]


# 15-minute grid, so that spans touch, overlap and sit exactly `window` apart.
spans = st.builds(
    lambda cid, start, length, targets: (cid, start * 900.0, (start + length) * 900.0,
                                         tuple(targets)),
    st.integers(0, 500), st.integers(0, 40), st.integers(0, 8),
    st.lists(st.integers(0, 6), max_size=3))
cluster_lists = st.lists(spans, max_size=14, unique_by=lambda c: c[0])
windows = st.sampled_from([0.0, 900.0, 1800.0, HOUR, 2.5 * HOUR])

uses = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(0, 4),
                          st.floats(0, 1e6, allow_nan=False)), max_size=40)


# ------------------------------------------------------------------------ helpers


def resolve(component: int, merged: Mapping[int, int]) -> int:
    while component in merged:
        component = merged[component]
    return component


def check_update(update: ComponentUpdate, batch_keys: Sequence[Sequence[int]],
                 known: Mapping[int, int]) -> None:
    """What every update promises about ``merged`` and ``indicators``."""
    assert set(update.indicators) == {k for keys in batch_keys for k in keys}
    stored = set(known.values())
    for old, new in update.merged.items():
        assert old in stored and new in stored
        assert new < old  # only ids that changed, and the smallest survives
        assert new not in update.merged


def apply_batches(kernel: Callable[..., ComponentUpdate], batches: list[list[Any]],
                  keys_of: Callable[[Any], list[int]]) -> tuple[dict[int, int], dict[int, int]]:
    """Feed ``batches`` to ``kernel`` the way a worker with a database would: ``known`` holds
    the stored entries for this batch's keys; the update is applied and re-pointed."""
    stored_assignments: dict[int, int] = {}
    stored_indicators: dict[int, int] = {}
    for batch in batches:
        batch_keys = [keys_of(row) for row in batch]
        known = {k: stored_indicators[k] for keys in batch_keys for k in keys
                 if k in stored_indicators}
        update = kernel(batch, known)
        check_update(update, batch_keys, known)
        stored_assignments.update(update.assignments)
        stored_assignments = {i: resolve(c, update.merged) for i, c in stored_assignments.items()}
        stored_indicators.update(update.indicators)
        stored_indicators = {k: resolve(c, update.merged) for k, c in stored_indicators.items()}
    return stored_assignments, stored_indicators


def assert_canonical(assignments: Mapping[int, int]) -> None:
    """Every component id is the smallest id among its members (and a member itself)."""
    members: dict[int, list[int]] = defaultdict(list)
    for item, component in assignments.items():
        members[component].append(item)
    for component, group in members.items():
        assert component == min(group)


def session_keys(session: tuple[int, int, int | None, tuple[int, ...]]) -> list[int]:
    _, _, fingerprint, credentials = session
    keys = [indicator_key(CREDENTIAL, c) for c in credentials]
    if fingerprint is not None:
        keys.append(indicator_key(FINGERPRINT, fingerprint))
    return keys


# ------------------------------------------------------------------------ link_components


@modest
@given(items())
def test_link_components_matches_pairwise_reference(rows: list[tuple[int, list[int]]]) -> None:
    before = copy.deepcopy(rows)
    update = link_components(rows)
    assert rows == before  # inputs are not touched
    assert update.assignments == naive_link_components(rows)
    assert update.merged == {}
    check_update(update, [keys for _, keys in rows], {})
    for item, keys in rows:
        for k in keys:
            assert update.indicators[k] == update.assignments[item]
    assert_canonical(update.assignments)


@modest
@given(items(ascending=True).flatmap(lambda rows: st.tuples(st.just(rows), batches_of(rows))))
def test_link_components_in_batches_equals_all_at_once(case: tuple[list, list]) -> None:
    rows, batches = case
    whole = link_components(rows)
    assignments, indicators = apply_batches(link_components, batches, lambda row: row[1])
    assert assignments == whole.assignments
    assert indicators == whole.indicators


def test_link_components_examples() -> None:
    update = link_components([(5, [1]), (3, [2]), (4, [1, 2]), (9, []), (7, [8])])
    # 5 and 3 share nothing, but 4 shares a key with each: one component, named 3.
    assert update.assignments == {3: 3, 4: 3, 5: 3, 9: 9, 7: 7}
    assert update.indicators == {1: 3, 2: 3, 8: 7}
    assert update.merged == {}


def test_link_components_incremental_example() -> None:
    # Stored: component 2 owns key 20, component 4 owns key 40, component 7 owns key 70.
    # Item 10 joins 4 and 7 (4 survives), item 11 is new, item 12 joins 2 through key 20.
    known = {20: 2, 40: 4, 70: 7, 99: 1}  # key 99 is not in this batch: ignored
    update = link_components([(10, [40, 70]), (11, [110]), (12, [20])], known)
    assert update.assignments == {10: 4, 11: 11, 12: 2}
    assert update.merged == {7: 4}
    assert update.indicators == {40: 4, 70: 4, 110: 11, 20: 2}


def test_link_components_rejects_a_batch_older_than_the_store() -> None:
    with pytest.raises(ValueError, match="greater than every item id"):
        link_components([(5, [1])], known={1: 8})
    with pytest.raises(ValueError, match="duplicate item id"):
        link_components([(5, [1]), (5, [2])])


def test_indicator_keys_are_unique_per_kind_and_id() -> None:
    kinds = (SOURCE, CREDENTIAL, FINGERPRINT, PAYLOAD)
    assert kinds == (0, 1, 2, 3)
    keys = {indicator_key(kind, ident) for kind in kinds for ident in range(100)}
    assert len(keys) == 400
    assert indicator_key(PAYLOAD, 7) == 7 * 8 + 3


# ------------------------------------------------------------------------ observations


@modest
@given(observations())
def test_cluster_observations_matches_pairwise_reference(rows: list) -> None:
    update = cluster_observations(rows)
    as_items = [(row[0], observation_indicators(row)) for row in rows]
    assert update.assignments == naive_link_components(as_items)
    assert update == link_components(as_items)
    assert_canonical(update.assignments)


@modest
@given(observations().flatmap(lambda rows: st.tuples(st.just(rows), batches_of(rows))))
def test_cluster_observations_in_batches_equals_all_at_once(case: tuple[list, list]) -> None:
    rows, batches = case
    whole = cluster_observations(rows)
    assignments, indicators = apply_batches(cluster_observations, batches,
                                            observation_indicators)
    assert assignments == whole.assignments
    assert indicators == whole.indicators


def test_cluster_observations_examples() -> None:
    rows = [
        (1, 100, None, None, 555),  # shares only the payload with 2
        (2, 200, 7, None, 555),
        (3, 300, 8, 9, None),  # shares nothing with anyone
        (4, 400, None, 9, None),  # shares the fingerprint with 3
        (5, 500, 7, None, None),  # shares the credential with 2
        (6, 300, None, None, None),  # shares the source with 3
    ]
    assert cluster_observations(rows).assignments == {1: 1, 2: 1, 5: 1, 3: 3, 4: 3, 6: 3}
    assert observation_indicators((1, 100, None, None, 555)) == [
        indicator_key(SOURCE, 100), indicator_key(PAYLOAD, 555)]
    # Ids need not arrive sorted; they must be unique.
    assert cluster_observations(rows[::-1]).assignments == cluster_observations(rows).assignments
    with pytest.raises(ValueError, match="duplicate observation id"):
        cluster_observations([(1, 1, None, None, None), (1, 2, None, None, None)])


# ------------------------------------------------------------------------ attribution


@modest
@given(sessions())
def test_attribute_sessions_matches_pairwise_reference(rows: list) -> None:
    update = attribute_sessions(rows)
    assert update.assignments == naive_link_components([(r[0], session_keys(r)) for r in rows])
    assert_canonical(update.assignments)


@modest
@given(sessions().flatmap(lambda rows: st.tuples(st.just(rows), batches_of(rows))))
def test_attribute_sessions_in_batches_equals_all_at_once(case: tuple[list, list]) -> None:
    rows, batches = case
    assignments, _ = apply_batches(attribute_sessions, batches, session_keys)
    assert assignments == attribute_sessions(rows).assignments


def test_attribute_sessions_examples() -> None:
    rows = [
        (1, 10, None, ()),
        (2, 10, None, ()),  # same source as 1 only: a different actor
        (3, 11, 77, ()),
        (4, 12, 77, ()),  # same fingerprint as 3, other source: the same actor
        (5, 13, None, (5, 6)),
        (6, 14, None, (6,)),  # shares credential 6 with 5
        (7, 10, 78, (9,)),
    ]
    identities = attribute_sessions(rows).assignments
    assert identities == {1: 1, 2: 2, 3: 3, 4: 3, 5: 5, 6: 5, 7: 7}
    sources = {r[0]: r[1] for r in rows}
    assert identities_across_sources(identities, sources) == {3: 2, 5: 2}
    assert identities_across_sources(identities, sources, min_sources=1) == {
        1: 1, 2: 1, 3: 2, 5: 2, 7: 1}


def naive_identities_across_sources(members: Mapping[int, int], session_sources: Mapping[int, int],
                                    min_sources: int) -> dict[int, int]:
    counted = defaultdict(set)
    for session, identity in members.items():
        if session in session_sources:
            counted[identity].add(session_sources[session])
    return {i: len(s) for i, s in counted.items() if len(s) >= min_sources}


@modest
@given(st.dictionaries(st.integers(0, 30), st.integers(0, 5), max_size=25),
       st.dictionaries(st.integers(0, 30), st.integers(0, 6), max_size=25),
       st.integers(1, 4))
def test_identities_across_sources_matches_grouping(members: dict[int, int],
                                                     session_sources: dict[int, int],
                                                     min_sources: int) -> None:
    assert identities_across_sources(members, session_sources, min_sources) == \
        naive_identities_across_sources(members, session_sources, min_sources)


def test_identities_across_sources_rejects_zero() -> None:
    with pytest.raises(ValueError):
        identities_across_sources({1: 1}, {1: 1}, min_sources=0)


# ------------------------------------------------------------------------ campaigns


@modest
@given(cluster_lists, windows)
def test_campaigns_match_pairwise_reference(clusters: list, window: float) -> None:
    result = campaigns(clusters, window)
    assert result == naive_campaigns(clusters, window)
    assert set(result) == {c[0] for c in clusters}
    assert_canonical(result)


def test_campaigns_examples() -> None:
    here = target_key(decoy_id=1, network_id=7)

    def pair(gap: float, window: float = HOUR, targets: tuple[int, ...] = (here,)
             ) -> dict[int, int]:
        first = (10, 0.0, 600.0, (here,))
        second = (20, 600.0 + gap, 1200.0 + gap, targets)
        return campaigns([second, first], window)

    assert pair(2 * HOUR) == {10: 10, 20: 20}  # same decoy, 2 h apart: not one campaign
    assert pair(HOUR / 2) == {10: 10, 20: 10}  # 30 min apart: one campaign
    assert pair(HOUR) == {10: 10, 20: 10}  # exactly the window apart still counts
    assert pair(-300.0) == {10: 10, 20: 10}  # overlapping spans are 0 apart
    assert pair(0.0, targets=(target_key(2, 7),)) == {10: 10, 20: 20}  # another decoy
    assert pair(0.0, targets=(target_key(1, 8),)) == {10: 10, 20: 20}  # same decoy, other /24
    assert pair(0.0, targets=(target_key(2, 8), here)) == {10: 10, 20: 10}
    assert pair(2 * HOUR, window=3 * HOUR) == {10: 10, 20: 10}


def test_campaigns_chain_and_long_spans() -> None:
    # A chain: 1-2 and 2-3 are within the window, 1-3 are not; one campaign all the same.
    chain = [(1, 0.0, 0.0, (5,)), (2, 3000.0, 3000.0, (5,)),
             (3, 6000.0, 6000.0, (5,))]
    assert campaigns(chain) == {1: 1, 2: 1, 3: 1}
    # A long span (1) contains a short one (2); 3 starts 2000 s after 1 ends but 11,800 s
    # after 2 ends: linked to 1, so a sweep must carry the running max, not the last end.
    nested = [(1, 0.0, 10_000.0, (5,)), (2, 100.0, 200.0, (5,)),
              (3, 12_000.0, 13_000.0, (5,))]
    assert campaigns(nested) == {1: 1, 2: 1, 3: 1}
    assert naive_campaigns(nested) == {1: 1, 2: 1, 3: 1}


def test_campaigns_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        campaigns([(1, 10.0, 5.0, (1,))])
    with pytest.raises(ValueError):
        campaigns([(1, 0.0, 5.0, (1,))], window=-1.0)
    with pytest.raises(ValueError):
        campaigns([(1, 0.0, 5.0, (1,)), (1, 0.0, 5.0, (2,))])


# ------------------------------------------------------------------------ credential reuse


@modest
@given(uses, st.integers(1, 4))
def test_credential_reuse_matches_grouping(rows: list, min_targets: int) -> None:
    assert credential_reuse(iter(rows), min_targets) == naive_credential_reuse(rows, min_targets)


def test_credential_reuse_example() -> None:
    rows = [
        (7, 1, 100, 50.0),
        (7, 2, 100, 10.0),
        (7, 2, 101, 90.0),
        (8, 1, 100, 20.0),  # one decoy, however often
        (8, 1, 102, 30.0),
        (3, 4, 100, 5.0),
        (3, 5, 100, 6.0),
        (3, 6, 100, 7.0),
    ]
    assert credential_reuse(rows) == [ReuseFinding(3, 3, 1, 5.0, 7.0),
                                      ReuseFinding(7, 2, 2, 10.0, 90.0)]
    assert credential_reuse(rows, min_targets=3) == [ReuseFinding(3, 3, 1, 5.0, 7.0)]
    assert [f.credential_id for f in credential_reuse(rows, min_targets=1)] == [3, 7, 8]
    with pytest.raises(ValueError):
        credential_reuse(rows, min_targets=0)


# ------------------------------------------------------------------------ plain data


def test_results_are_plain_picklable_data() -> None:
    update = cluster_observations([(1, 1, 2, None, None), (2, 1, None, None, None)])
    assert pickle.loads(pickle.dumps(update)) == update
    assert type(pickle.loads(pickle.dumps(update))) is ComponentUpdate
    finding = credential_reuse([(1, 1, 1, 0.0), (1, 2, 1, 1.0)])
    assert pickle.loads(pickle.dumps(finding)) == finding

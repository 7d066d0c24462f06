"""online_batch._Edges: every event's bisect_right in its own state's times, from one searchsorted over the
touched states laid end to end (in groups when the keys would not fit in 63 bits, per event when a state spans
centuries), equal to bisect_right itself."""

from __future__ import annotations

from array import array
from bisect import bisect_right

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.features.online_batch import _Edges

DAY = 86_400 * 10**9


def check(states: list[list[int]], u: list[int], times: list[int], offsets: list[int]) -> _Edges:
    arrays = [array("q", sorted(s)) for s in states]
    edges = _Edges(arrays, u, times)
    for offset in offsets:
        want = [bisect_right(arrays[k], t - offset) for k, t in zip(u, times, strict=True)]
        assert edges.bisect_right(offset).tolist() == want, offset
    return edges


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_property_edges_equal_bisect_right(data) -> None:
    span = data.draw(st.sampled_from([10, 10**6, 40 * DAY, 2**61, 2**62 + 5]))  # the last ones: groups, fallback
    low = -(2**62) if span > 2**61 else 1_500_000_000 * 10**9
    k = data.draw(st.integers(1, 12))
    states = [data.draw(st.lists(st.integers(low, low + span), min_size=1, max_size=8)) for _ in range(k)]
    n = data.draw(st.integers(k, 30))
    u = list(range(k)) + [data.draw(st.integers(0, k - 1)) for _ in range(n - k)]  # each state has an event
    times = [data.draw(st.integers(low, low + span)) for _ in u]
    offsets = [0, 1, *data.draw(st.lists(st.integers(0, span), max_size=3)), span + 7]
    check(states, u, times, offsets)


def test_states_far_apart_are_searched_in_groups() -> None:
    """Each state spans 2**60 ns: two states fit in one group's 63-bit keys, not twelve."""
    rng = np.random.default_rng(3)
    base = -(2**62)
    states = [[base, base + 2**60, *map(int, base + rng.integers(0, 2**60, 5))] for _ in range(12)]
    u = [int(x) for x in rng.permutation(np.arange(40) % 12)]
    times = [int(base + rng.integers(0, 2**60)) for _ in u]
    edges = check(states, u, times, [0, 3, 2**59, 2**60 + 1])
    assert edges._groups is not None and len(edges._groups) > 1


@pytest.mark.parametrize("offset", [0, 2**62])
def test_a_state_spanning_centuries_falls_back_to_bisect(offset) -> None:
    states = [[-(2**62), 2**62], [0, 5]]
    edges = check(states, [0, 1, 0], [2**62, 5, 0], [offset, 1])
    assert edges._groups is None

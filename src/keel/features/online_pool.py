"""Column-oriented entity states for the online store: one :class:`Pool` per entity column, no object per state.

A pool holds every state (one per entity key) of one entity column in shared numpy arrays, one entry per stored
event: ``t`` (int64 ns), ``seq`` (its row on disk), ``ids`` (event id or None), one float64 array per value column,
``label`` and ``label_at``. A state is a *slot* (an int, from :meth:`Pool.slot`) owning the contiguous region
``[start[slot], end[slot])`` of those arrays, in (time, arrival) order, with spare room up to ``cap[slot]`` and
one header row at ``start - 1`` whose prefix sums are the region's base (what precedes ``start``). A
state that outgrows its room is moved to the pool's tail with twice the room (:meth:`Pool.append`); pruning
advances ``start``. Moves and prunes leave dead rows behind: once half the pool's rows are dead, a compaction
pass packs the regions in place, a bounded step at a time, at the end of each store call (:meth:`Pool.tidy`),
so no single call pays for a whole-array copy; :meth:`Pool.compact` packs everything into fresh arrays at once
(the store's preload). A batch of events is then a few numpy operations over the whole batch: appends are fancy assignments
at ``end[slot] + rank within the batch``, window edges a vectorised binary search over each event's region
(:meth:`Pool.bisect_right`).

Sums are exact (:class:`Track`): per value column (and the labels) an inclusive prefix sum per entry, an integer
on a per-slot grid ``2**-shift[slot]`` (rescaled when a finer value arrives) kept in two int64 limbs
(``hi * 2**48 + lo``), starting from the header row's (0 for a new state; what the pruned front summed to once
pruned: a prune only advances ``start``). A window's sum is the difference of two prefixes (at ``hi - 1`` and
``lo - 1``) divided by ``2**shift`` once: the exact sum rounded once, what ``math.fsum`` of the window's values
gives (:meth:`Pool.sums` converts the limbs with numpy where two doubles provably round once, else exactly in
Python ints). A slot whose prefixes outgrow the limbs (a term of about 2**110 on its grid: 1e300 next to 1e-300)
is *wide* on that track: its windows there are summed by scanning their values, the same numbers. The label track is kept only for the slots that ever held a non-zero label (``late != NEVER``): the others
hold only zero labels, their label sums are 0 without reading it, and it is rebuilt when their first non-zero
label arrives (single inserts then skip three row writes per event, as the state path kept no label sums there). NaN adds nothing and is not counted valid; an infinity adds nothing, counts valid and counts in ``bad``
(a window holding one is summed by scanning its values instead).

Rows of a region's room (``[end, cap)``) always hold label 0.0, not arrived (``NO_LABEL_AT``): fresh rows are
filled so, and whatever leaves rows behind inside an allocation (a shift back, a truncate) resets them; an insert at
the end need not write them.

Positions (indices into the row arrays) are valid until the next :meth:`Pool.append` / :meth:`Pool.insert`
that moves the slot, :meth:`Pool.compact` or compaction step (:meth:`Pool.tidy`, :meth:`Pool.compact_step`);
slots and keys are stable.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from keel.features.offline import finish_aggregate

NO_LABEL_AT = 2**62  # label_at of an event without a label (online._NO_LABEL_AT)
NEVER = -(2**63)  # Pool.late of a state that never held a non-zero label
NONFINITE = 2**63 - 1  # Pool.late of a state that held a NaN or infinite label: its label sums scan
_MIN_ROOM = 8  # a state's room when it first needs one
# a compaction pass starts (:meth:`Pool.tidy`) when more than _PASS_MIN rows are handed out and more than
# _PASS_WASTE of them are dead, or more than _PASS_FULL of the arrays' rows are handed out and more than
# _PASS_SOME of them are dead (a pass before the arrays must grow)
_PASS_MIN = 4096
_PASS_WASTE = 0.5
_PASS_FULL = 0.7
_PASS_SOME = 0.15
# a batch call (``tidy(ahead=True)``) grows the arrays when states hold more than this share of their rows, so
# that single events rarely find them full
_AHEAD = 0.45
# during a pass, each :meth:`Pool.tidy` earns _CALL_ROWS rows of compaction plus twice the rows the call added at
# the tail; a step runs once _STEP_ROWS are earned (~0.6 ms: one request in ~30 pays it). A pass is spread thin (a
# 180k-row pool: ~5,600 single calls) because a service near its capacity has little room per request: a step of
# 1,000 rows on every call queued requests at 1,500 req/s as the whole-array copy did
_CALL_ROWS = 32
_STEP_ROWS = 1024
_SCAN_WEIGHT = 64  # a dead row skipped costs a copied row's 1/_SCAN_WEIGHT
# False sends every window down the scanning path (math.fsum over the window): tests set it to compare both paths
EXACT = True
# prefix sums as two int64 limbs (Track): prefix = hi * 2**_LIMB + lo, 0 <= lo < 2**_LIMB, |hi| < _HI_MAX (so a
# difference of two his fits in int64 and a carry never overflows)
_LIMB = 48
_LOW = (1 << _LIMB) - 1
_HI_MAX = 1 << 62
_TINY = 2.0**-1022  # the smallest normal double
WIDE = -1  # Track.shift of a slot whose limbs are not kept (its windows on that track scan)


def _ratio(x: float) -> tuple[int, int]:
    """A finite float as ``(n, k)`` with ``x == n / 2**k`` exactly."""
    num, den = x.as_integer_ratio()
    return num, den.bit_length() - 1


def _objects(values: Iterable[Any], n: int) -> np.ndarray:
    out = np.empty(n, dtype=object)
    out[:] = list(values) if n else []
    return out


def _grown(a: np.ndarray, size: int, fill: Any = 0) -> np.ndarray:
    b = np.empty(size, dtype=a.dtype)  # (each row written once: the copy, then the fill after it)
    b[: len(a)] = a
    b[len(a):] = fill
    return b


class Track:
    """Exact inclusive prefix sums of one float column of a pool (a value column, or the labels).

    Per entry the prefix sum as two int64 limbs, ``hi`` and ``lo``: the integer ``hi * 2**48 + lo`` on the slot's
    grid, kept canonical (``0 <= lo < 2**48``, ``|hi| < 2**62``: :data:`_HI_MAX`) after every write; ``valid``
    (non-NaN count) and ``bad`` (infinity count), inclusive, on top of the slot's header row; per slot ``shift``.
    The sum of region entries ``[lo, hi)`` is ``(prefix[hi - 1] - prefix[lo - 1]) / 2**shift``. A slot whose
    prefixes outgrow the limbs (a term of ``2**110`` or more on its grid, e.g. 1e300 after 1e-300) is *wide* on
    the track: its shift is :data:`WIDE`, its limbs are no longer kept (its windows scan the column's values) until
    its state is rebuilt (:meth:`Pool._label_track`); its counts stay kept.
    """

    __slots__ = ("bad", "bad_view", "hi", "hi_view", "lo", "lo_view", "name", "shift", "shift_view", "valid",
                 "valid_view")

    def __init__(self, rows: int, slots: int, name: str | None = None) -> None:
        self.name = name  # the value column (None: the labels)
        self.hi = np.zeros(rows, dtype=np.int64)
        self.lo = np.zeros(rows, dtype=np.int64)
        self.valid = np.zeros(rows, dtype=np.int64)
        self.bad = np.zeros(rows, dtype=np.int64)
        self.shift = np.zeros(slots, dtype=np.int64)
        self.hi_view = memoryview(self.hi)
        self.lo_view = memoryview(self.lo)
        self.valid_view = memoryview(self.valid)
        self.bad_view = memoryview(self.bad)
        self.shift_view = memoryview(self.shift)

    def _grow_slots(self, size: int) -> None:
        self.shift = _grown(self.shift, size)

    def prefix(self, i: int) -> int:
        """Entry ``i``'s prefix sum on its slot's grid, as a Python int (not for a wide slot)."""
        return (self.hi_view[i] << _LIMB) + self.lo_view[i]

    def between(self, a: int, b: int) -> int:
        """Entry ``a``'s prefix minus entry ``b``'s (one slot, not wide), as a Python int: the sum on the slot's
        grid of the entries ``(b, a]``."""
        return ((self.hi_view[a] - self.hi_view[b]) << _LIMB) + (self.lo_view[a] - self.lo_view[b])

    def widen(self, slot: int) -> None:
        """Stop keeping the slot's limbs: its windows on this track scan from now on."""
        self.shift[slot] = WIDE

    def put(self, slot: int, i: int, term: int) -> None:
        """Row ``i``'s prefix is row ``i - 1``'s plus ``term`` (an int on the slot's grid; the slot not wide),
        or the slot widens when it would outgrow the limbs."""
        lo = self.lo_view[i - 1] + term
        h = self.hi_view[i - 1] + (lo >> _LIMB)
        if -_HI_MAX < h < _HI_MAX:
            self.hi_view[i] = h
            self.lo_view[i] = lo & _LOW
        else:
            self.widen(slot)

    def add(self, slot: int, a: int, b: int, term: int) -> None:
        """Add ``term`` (an int on the slot's grid) to the prefixes of rows ``[a, b)`` of a slot (not wide),
        widening the slot when a prefix would outgrow the limbs."""
        if not term or a >= b:
            return
        th, tl = term >> _LIMB, term & _LOW
        hi, lo = self.hi[a:b], self.lo[a:b]
        if abs(th) + 1 >= _HI_MAX - max(-int(hi.min()), int(hi.max())):
            self.widen(slot)
            return
        lo += tl
        hi += th + (lo >> _LIMB)
        lo &= _LOW

    def rescale(self, slot: int, k: int, start: int, end: int) -> None:
        """Move a slot's sums (header row included) to the finer grid ``2**-k`` (``k`` above its shift), or widen
        it when they would outgrow the limbs; nothing for a wide slot."""
        shift = int(self.shift[slot])
        if shift == WIDE:
            return
        up = k - shift
        hi, lo = self.hi[start - 1:end], self.lo[start - 1:end]
        while up > 0:  # (by up to 48 bits at a time: the bits lo loses are hi's carry)
            s = min(up, _LIMB)
            top = max(-int(hi.min()), int(hi.max()))
            if top >= (_HI_MAX >> s) - 1:  # (|hi << s| + carry < 2**62 below this)
                self.widen(slot)
                return
            if not top and not lo.any():  # (all 0: 0 on every grid)
                break
            hi <<= s
            hi += lo >> (_LIMB - s)
            lo &= (1 << (_LIMB - s)) - 1
            lo <<= s
            up -= s
        self.shift[slot] = k


class Pool:
    """Every state of one entity column (see the module docstring); ``columns``: the value columns kept."""

    def __init__(self, columns: Sequence[str] = (), *, rows: int = 1024, slots: int = 64) -> None:
        self.columns = tuple(columns)
        self.index: dict[str, int] = {}  # key -> slot
        self.keys: list[str] = []  # slot -> key
        self.used = 0  # rows handed out to regions (live or dead)
        self.live = 0  # rows inside some [start, end)
        self.held = 0  # rows inside some [start - 1, cap): headers, live rows and room
        rows, slots = max(rows, 1), max(slots, 1)
        self.t = np.zeros(rows, dtype=np.int64)
        self.seq = np.zeros(rows, dtype=np.int64)
        self.ids = np.empty(rows, dtype=object)
        self.values = {c: np.zeros(rows, dtype=np.float64) for c in self.columns}
        self.label = np.zeros(rows, dtype=np.float64)
        self.label_at = np.full(rows, NO_LABEL_AT, dtype=np.int64)
        self.tracks = {c: Track(rows, slots, c) for c in self.columns}
        self.labels = Track(rows, slots)
        self.start = np.zeros(slots, dtype=np.int64)
        self.end = np.zeros(slots, dtype=np.int64)
        self.cap = np.zeros(slots, dtype=np.int64)
        self.base = np.zeros(slots, dtype=np.int64)  # per slot, the first row of its allocation (header at most)
        # per slot, the latest arrival of a non-zero label (an upper bound; NEVER: none, NONFINITE: a NaN or
        # infinite one): a window of an event at or after it sees every label it holds, so its label sum comes
        # from the prefix sums (online._EntityState.late_label)
        self.late = np.full(slots, NEVER, dtype=np.int64)
        # per row, the slot whose allocation begins there (its ``base``), else -1: how a compaction step finds the
        # next allocation in row order
        self.head = np.full(rows, -1, dtype=np.int64)
        self.cursor = -1  # during a compaction pass: every allocation beginning below it is packed; else -1
        self._scan = 0  # during a pass: rows [cursor, _scan) are in no allocation
        self._mark = 0  # ``used`` at the end of the latest :meth:`tidy`
        self._credit = 0  # during a pass: rows of compaction earned by calls and not run yet
        self.passes = 0  # compaction passes started (:meth:`tidy`)
        self.growths = 0  # times the row arrays were regrown (:meth:`_reserve`)
        self._views()

    def _views(self) -> None:
        # memoryviews: element access as plain Python ints/floats, about twice as fast as numpy scalars (the
        # single-event path, ``bisect``); rebuilt whenever an array is replaced
        self.t_view = memoryview(self.t)
        self.seq_view = memoryview(self.seq)
        self.label_view = memoryview(self.label)
        self.label_at_view = memoryview(self.label_at)
        self.value_views = {c: memoryview(a) for c, a in self.values.items()}
        self.start_view, self.end_view = memoryview(self.start), memoryview(self.end)
        self.cap_view, self.late_view = memoryview(self.cap), memoryview(self.late)
        for track in self._all_tracks():
            track.hi_view = memoryview(track.hi)
            track.lo_view = memoryview(track.lo)
            track.valid_view = memoryview(track.valid)
            track.bad_view = memoryview(track.bad)
            track.shift_view = memoryview(track.shift)

    # --- slots ------------------------------------------------------------------------------------------------
    def slot(self, key: str) -> int:
        """The slot of ``key``'s state, created empty when new."""
        s = self.index.get(key)
        if s is None:
            s = self._new_slots([key])[0]
        return s

    def slots(self, keys: Sequence[str]) -> np.ndarray:
        """:meth:`slot` of each key, as an int64 array."""
        found = list(map(self.index.get, keys))
        if None in found:
            new = [k for k in dict.fromkeys(k for k, s in zip(keys, found, strict=True) if s is None)]
            self._new_slots(new)
            found = list(map(self.index.__getitem__, keys))
        return np.array(found, dtype=np.int64)

    def _new_slots(self, keys: list[str]) -> list[int]:
        first = len(self.keys)
        need = first + len(keys)
        if need > len(self.start):
            size = max(need, 2 * len(self.start))
            self.start, self.end, self.cap, self.base = (_grown(a, size)
                                                         for a in (self.start, self.end, self.cap, self.base))
            self.late = _grown(self.late, size, NEVER)
            for track in self._all_tracks():
                track._grow_slots(size)
        out = list(range(first, need))
        self.keys.extend(keys)
        self.index.update(zip(keys, out, strict=True))
        # an empty region at the tail: its header row (prefix 0), no room yet (the first append gives it some)
        k = len(keys)
        self._reserve(k)
        header = np.arange(self.used, self.used + k, dtype=np.int64)
        for track in self._all_tracks():
            track.hi[header] = 0
            track.lo[header] = 0
            track.valid[header] = 0
            track.bad[header] = 0
        self.start[first:need] = self.end[first:need] = self.cap[first:need] = header + 1
        self.base[first:need] = header
        self.head[header] = out
        self.used += k
        self.held += k
        self._views()
        return out

    def _all_tracks(self) -> list[Track]:
        return [*self.tracks.values(), self.labels]

    def size(self, slot: int) -> int:
        return int(self.end[slot] - self.start[slot])

    # --- rows -------------------------------------------------------------------------------------------------
    def _row_arrays(self) -> list[np.ndarray]:
        out = [self.t, self.seq, self.ids, *self.values.values(), self.label, self.label_at]
        for track in self._all_tracks():
            out += (track.hi, track.lo, track.valid, track.bad)
        return out

    def _set_row_arrays(self, arrays: list[np.ndarray]) -> None:
        it = iter(arrays)
        self.t, self.seq, self.ids = next(it), next(it), next(it)
        for c in self.columns:
            self.values[c] = next(it)
        self.label, self.label_at = next(it), next(it)
        for track in self._all_tracks():
            track.hi, track.lo, track.valid, track.bad = next(it), next(it), next(it), next(it)
        self._views()

    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` more rows at the pool's tail."""
        need = self.used + rows
        size = len(self.t)
        if need <= size:
            return
        self.grow(max(need, 2 * size))

    def grow(self, size: int) -> None:
        """Row arrays of ``size`` rows (more than now): a copy of every row array."""
        arrays = self._row_arrays()
        fills = [0, 0, None, *[0.0] * len(self.columns), 0.0, NO_LABEL_AT] + [0] * (4 * len(self._all_tracks()))
        self._set_row_arrays([_grown(a, size, f) for a, f in zip(arrays, fills, strict=True)])
        self.head = _grown(self.head, size, -1)
        self.growths += 1

    def _move(self, slots: np.ndarray, room: np.ndarray) -> None:
        """Move each slot's region (and header row) to the pool's tail with ``room`` rows of room (at least its
        size)."""
        size = self.end[slots] - self.start[slots]
        offsets = self.used + np.cumsum(room + 1) - (room + 1)  # each slot's new header row
        total = int(room.sum()) + len(slots)
        self._reserve(total)
        self.held += total - int((self.cap[slots] - self.start[slots] + 1).sum())
        self._relocate(slots, offsets, size, room)
        self.used += total

    def _relocate(self, slots: np.ndarray, offsets: np.ndarray, size: np.ndarray, room: np.ndarray) -> int:
        """Copy each slot's header row and ``size`` rows to start at ``offsets`` (its new header row), give it
        ``room`` rows there and point its bounds, ``base`` and ``head`` entry at them; returns the rows copied.
        Overlapping spans are safe (the gather copies first); ``held`` and ``used`` are the caller's."""
        src, dst = _spans(self.start[slots] - 1, offsets, size + 1)
        for a in self._row_arrays():
            a[dst] = a[src]
        self.start[slots] = offsets + 1
        self.end[slots] = offsets + 1 + size
        self.cap[slots] = offsets + 1 + room
        self.head[self.base[slots]] = -1
        self.head[offsets] = slots
        self.base[slots] = offsets
        return len(src)

    def _move_one(self, slot: int, room: int) -> None:
        """:meth:`_move` of one slot, by slices."""
        start, end = int(self.start[slot]), int(self.end[slot])
        self._reserve(room + 1)
        dst = self.used
        for a in self._row_arrays():
            a[dst:dst + end - start + 1] = a[start - 1:end]
        self.held += room + 1 - (int(self.cap[slot]) - start + 1)
        self.start[slot] = dst + 1
        self.end[slot] = dst + 1 + end - start
        self.cap[slot] = dst + 1 + room
        self.head[self.base[slot]] = -1
        self.head[dst] = slot
        self.base[slot] = dst
        self.used += room + 1

    def _shift_back(self, slot: int) -> None:
        """Move a slot's region (and header row) back to the first row of its allocation, over its pruned front
        (the room a prune left before it becomes room after it)."""
        start, end, base = int(self.start[slot]), int(self.end[slot]), int(self.base[slot])
        for a in self._row_arrays():
            a[base:base + end - start + 1] = a[start - 1:end]  # (numpy copies overlapping ranges safely)
        self.held += start - 1 - base
        self.start[slot] = base + 1
        self.end[slot] = base + 1 + end - start
        self.label[base + 1 + end - start:end] = 0.0  # (the rows left behind are room again)
        self.label_at[base + 1 + end - start:end] = NO_LABEL_AT
    def _room(self, slots: np.ndarray, extra: np.ndarray) -> None:
        """Make room for ``extra`` more rows after each slot's end (distinct slots), moving the full ones."""
        full = self.end[slots] + extra > self.cap[slots]
        if full.any():
            slots, extra = slots[full], extra[full]
            size = self.end[slots] - self.start[slots]
            # a pruned front as large as half the rows to hold: shift back over it in place (as insert does)
            gap = self.start[slots] - 1 - self.base[slots]
            back = (gap > (size + extra) // 2) & (self.base[slots] + 1 + size + extra <= self.cap[slots])
            if back.any():
                self._shift_back_many(slots[back])
                slots, extra, size = slots[~back], extra[~back], size[~back]
            if len(slots):
                self._move(slots, np.maximum(2 * (size + extra), _MIN_ROOM))

    def _shift_back_many(self, slots: np.ndarray) -> None:
        """:meth:`_shift_back` of distinct slots at once."""
        start, end, base = self.start[slots], self.end[slots], self.base[slots]
        src, dst = _spans(start - 1, base, end - start + 1)
        for a in self._row_arrays():
            a[dst] = a[src]  # (the gather copies first: regions and their fronts never overlap another slot's)
        self.held += int((start - 1 - base).sum())
        self.start[slots] = base + 1
        self.end[slots] = base + 1 + end - start
        left, _ = _spans(base + 1 + end - start, base, start - 1 - base)  # (the rows left behind are room again)
        self.label[left] = 0.0
        self.label_at[left] = NO_LABEL_AT

    def compact(self) -> None:
        """Pack every region (header row, rows, room for as many rows again as it holds, none for an empty one) at
        the front of fresh arrays; positions change."""
        slots = np.arange(len(self.keys), dtype=np.int64)
        size = self.end[slots] - self.start[slots]
        room = np.where(size > 0, np.maximum(2 * size, _MIN_ROOM), 0)
        offsets = np.cumsum(room + 1) - (room + 1)
        total = int(room.sum()) + len(slots)
        # (room to spare: moves fill the tail until half the rows are dead, when the store compacts again)
        fresh = Pool(self.columns, rows=max(3 * total, 1024), slots=1)
        arrays = fresh._row_arrays()
        src, dst = _spans(self.start[slots] - 1, offsets, size + 1)
        for a, b in zip(self._row_arrays(), arrays, strict=True):
            b[dst] = a[src]
        self._set_row_arrays(arrays)
        self.start[slots] = offsets + 1
        self.end[slots] = offsets + 1 + size
        self.cap[slots] = offsets + 1 + room
        self.base[slots] = offsets
        self.head = np.full(len(self.t), -1, dtype=np.int64)
        self.head[offsets] = slots
        self.used = self.held = self._mark = total
        self.cursor = -1  # (a pass under way has nothing left to do)
        for track in self._all_tracks():  # wide slots whose values fit the limbs again (e.g. pruned) get them back
            # (a label track widens only once kept: never for a slot with ``late == NEVER``)
            for s in slots[track.shift[slots] == WIDE].tolist():
                self._rebuild(track, s)

    def _rebuild(self, track: Track, slot: int) -> None:
        """Give a wide slot its limbs back when its region's prefixes fit them: recomputed from its values on the
        finest grid they need, the header row at 0 (windows read differences only)."""
        values = (self.label if track.name is None else self.values[track.name])[self.start[slot]:self.end[slot]]
        ratios = [_ratio(v) if v - v == 0.0 else None for v in values.tolist()]  # (None: NaN or infinite)
        k = max((r[1] for r in ratios if r is not None), default=0)
        prefixes = [0]
        for r in ratios:
            prefixes.append(prefixes[-1] if r is None else prefixes[-1] + (r[0] << (k - r[1])))
        if max(prefixes) >= _HI_MAX << _LIMB or min(prefixes) <= -(_HI_MAX << _LIMB):  # (|hi| < 2**62)
            return
        rows = slice(int(self.start[slot]) - 1, int(self.end[slot]))
        track.hi[rows] = [p >> _LIMB for p in prefixes]
        track.lo[rows] = [p & _LOW for p in prefixes]
        track.shift[slot] = k

    def wasted(self) -> float:
        """The share of the pool's handed-out rows in no region (left by moves and prunes: what :meth:`compact`
        and compaction passes free)."""
        return 1.0 - self.held / self.used if self.used else 0.0

    # --- incremental compaction -------------------------------------------------------------------------------
    def tidy(self, *, ahead: bool = False) -> int:
        """Where a store call no longer uses positions it read: start a compaction pass when more than half the
        handed-out rows are dead, and during a pass earn :data:`_CALL_ROWS` rows of compaction plus twice what
        the pool's tail grew by since the previous call (so a pass outpaces the rows calls add, and ends); once
        :data:`_STEP_ROWS` are earned, run a step of that many. ``ahead`` (a batch call, whose pause is shared by
        its events): grow the arrays when states hold more than :data:`_AHEAD` of them. Returns the rows copied. Positions change."""
        rows = len(self.t)
        if ahead and self.held > _AHEAD * rows:
            self.grow(2 * rows)
        if self.cursor < 0:
            wasted = self.wasted()
            if self.used <= _PASS_MIN or not (wasted > _PASS_WASTE or (wasted > _PASS_SOME
                                                                       and self.used > _PASS_FULL * rows)):
                self._mark = self.used
                return 0
            self.begin_pass()
        self._credit += _CALL_ROWS + 2 * max(self.used - self._mark, 0)
        self._mark = self.used
        if self._credit < _STEP_ROWS:
            return 0
        budget, self._credit = self._credit, 0
        copied = self.compact_step(budget)
        self._mark = self.used
        return copied

    def begin_pass(self) -> None:
        """Start a compaction pass from the first row (:meth:`compact_step` carries it on)."""
        self.cursor = self._scan = self._credit = 0
        self.passes += 1

    def compact_step(self, budget: int) -> int:
        """Carry a compaction pass on by about ``budget`` copied rows (at least one allocation; a skipped dead row
        counts 1/:data:`_SCAN_WEIGHT`): each next allocation in row order moves down to the cursor in place
        (header row and rows; its room trimmed to twice its size, at least :data:`_MIN_ROOM`, when it had more),
        and the cursor follows it. When the cursor reaches ``used``, the rows after it are handed back (``used``
        becomes the cursor) and the pass ends. Returns the rows copied; positions change. Allocations moved to
        the tail meanwhile are reached later in the same pass; no fresh arrays."""
        c, p = self.cursor, self._scan
        if c < 0:
            return 0
        copied = spent = 0  # (spent: in 1/_SCAN_WEIGHT rows)
        limit = budget * _SCAN_WEIGHT
        head = self.head
        window = 4 * budget  # rows searched for allocations, four times more after a search that moved none
        while spent < limit:
            if p >= self.used:
                self._end_pass(c)
                return copied
            hi = min(self.used, p + window, p + limit - spent)
            heads = np.flatnonzero(head[p:hi] >= 0)
            if not len(heads):
                spent += hi - p
                p = hi
                window *= 4
                continue
            heads += p
            slots = head[heads]
            start, end, cap = self.start[slots], self.end[slots], self.cap[slots]
            size = end - start
            room = np.minimum(cap - start, np.maximum(2 * size, _MIN_ROOM))
            offsets = c + np.cumsum(room + 1) - (room + 1)
            moved = (offsets != start - 1) | (room != cap - start)  # (else already in place)
            # each allocation's cost: the dead rows before it, then its rows copied or (in place) skipped
            gaps = heads - np.concatenate(([p], cap[:-1]))
            cost = np.cumsum(gaps + np.where(moved, _SCAN_WEIGHT * (size + 1), cap - heads))
            k = min(int(np.searchsorted(cost, limit - spent)) + 1, len(slots))
            spent += int(cost[k - 1])
            c, p = int(offsets[k - 1] + room[k - 1]) + 1, int(cap[k - 1])
            moved[k:] = False
            if not moved.any():
                window *= 4
                continue
            slots, start, cap, size, room, offsets = (a[moved] for a in (slots, start, cap, size, room, offsets))
            copied += self._relocate(slots, offsets, size, room)
            rows, _ = _spans(offsets + 1 + size, offsets, room - size)  # their room: no label, as every room row
            self.label[rows] = 0.0
            self.label_at[rows] = NO_LABEL_AT
            self.held -= int((cap - start - room).sum())
        self.cursor, self._scan = c, p
        return copied

    def _end_pass(self, c: int) -> None:
        """The pass reached ``used``: the rows from ``c`` on are in no allocation; they go back to the tail,
        holding no label as fresh rows do."""
        self.label[c:self.used] = 0.0
        self.label_at[c:self.used] = NO_LABEL_AT
        self.used = self._mark = c
        self.cursor = -1

    # --- appends ----------------------------------------------------------------------------------------------
    def appendable(self, u: np.ndarray, t: np.ndarray) -> bool:
        """Whether appending events (slots ``u``, times ``t``, in this order) keeps every region in time order:
        per slot the times never go back, nor before the slot's newest stored time."""
        n = len(u)
        if not n:
            return True
        order = np.argsort(u, kind="stable")
        su, st = u[order], t[order]
        first = np.ones(n, dtype=bool)
        first[1:] = su[1:] != su[:-1]
        if not np.all(first[1:] | (st[1:] >= st[:-1])):
            return False
        heads = su[first]
        stored = self.end[heads] > self.start[heads]
        if not stored.any():
            return True
        newest = self.t[self.end[heads[stored]] - 1]
        return bool(np.all(st[first][stored] >= newest))

    def append(self, u: np.ndarray, t: np.ndarray, values: Mapping[str, np.ndarray], seq: np.ndarray,
               ids: Sequence[str | None] | None = None, labels: np.ndarray | None = None,
               label_at: np.ndarray | None = None) -> np.ndarray:
        """Append events (slots ``u``, times ``t``, a float64 array per value column (NaN where missing), row seqs,
        event ids) after their slots' stored events; :meth:`appendable` must hold. Labels start at 0.0, not
        arrived, unless ``labels`` and ``label_at`` give them (stored events loaded from disk). Returns each
        event's position."""
        n = len(u)
        if not n:
            return np.zeros(0, dtype=np.int64)
        u = np.asarray(u, dtype=np.int64)
        order = np.argsort(u, kind="stable")
        su = u[order]
        first = np.ones(n, dtype=bool)
        first[1:] = su[1:] != su[:-1]
        heads = np.flatnonzero(first)
        counts = np.diff(np.append(heads, n))
        slots = su[heads]
        self._room(slots, counts)
        rank_sorted = np.arange(n, dtype=np.int64) - np.repeat(heads, counts)
        pos_sorted = np.repeat(self.end[slots], counts) + rank_sorted
        pos = np.empty(n, dtype=np.int64)
        pos[order] = pos_sorted
        self.t[pos] = t
        self.seq[pos] = seq
        self.ids[pos] = None if ids is None else _objects(ids, n)
        group = _Groups(order, heads, counts, slots, pos_sorted)
        for c in self.columns:
            column = np.asarray(values[c], dtype=np.float64) if c in values else np.full(n, math.nan)
            self.values[c][pos] = column
            self._push(self.tracks[c], group, column[order])
        if labels is None or label_at is None:
            self.label[pos] = 0.0
            self.label_at[pos] = NO_LABEL_AT
            self._push_zeros(self.labels, group)
        else:
            y = np.asarray(labels, dtype=np.float64)
            at = np.asarray(label_at, dtype=np.int64)
            self.label[pos] = y
            self.label_at[pos] = at
            self._label_track(slots[self.late[slots] == NEVER])
            self._push(self.labels, group, y[order])
            marked = np.flatnonzero(y != 0.0)  # (NaN too) set_label's rule for ``late``
            if len(marked):
                late = np.where(np.isfinite(y[marked]), at[marked], NONFINITE)
                np.maximum.at(self.late, u[marked], late)
        self.end[slots] += counts
        self.live += n
        return pos

    def truncate(self, slots: np.ndarray, sizes: np.ndarray) -> None:
        """Cut each slot (distinct) back to ``sizes`` rows (what :meth:`size` gave before an :meth:`append`): the
        undo of appends. The rows stay where a move put them; a finer grid reached meanwhile stays (exact)."""
        slots = np.asarray(slots, dtype=np.int64)
        ends = self.start[slots] + np.asarray(sizes, dtype=np.int64)
        self.live -= int((self.end[slots] - ends).sum())
        cut, _ = _spans(ends, ends, self.end[slots] - ends)  # (room again: no label)
        self.label[cut] = 0.0
        self.label_at[cut] = NO_LABEL_AT
        self.end[slots] = ends

    @staticmethod
    def _before(track: Track, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hi, lo, valid, bad) of the region entries before position ``at`` (exclusive prefix: the entry at
        ``at - 1``, the header row at the region's start)."""
        prev = at - 1
        return track.hi[prev], track.lo[prev], track.valid[prev], track.bad[prev]

    def _push_zeros(self, track: Track, g: _Groups) -> None:
        """Append 0.0 (valid, on every grid) to the label track."""
        h0, l0, v0, b0 = self._before(track, self.end[g.slots])
        track.hi[g.pos_sorted] = np.repeat(h0, g.counts)
        track.lo[g.pos_sorted] = np.repeat(l0, g.counts)
        track.valid[g.pos_sorted] = np.repeat(v0, g.counts) + g.rank_sorted + 1
        track.bad[g.pos_sorted] = np.repeat(b0, g.counts)

    def _push(self, track: Track, g: _Groups, v: np.ndarray) -> None:
        """Append the values ``v`` (sorted by slot, as ``g``) to a track: finer grids first, then the terms'
        running sums per slot on top of each slot's last prefix, in limbs (slots whose prefixes would outgrow the
        limbs become wide first)."""
        valid = v == v
        finite = np.isfinite(v)
        clean = np.where(finite, v, 0.0)
        shift = np.repeat(track.shift[g.slots], g.counts)
        with np.errstate(over="ignore"):
            scaled = np.ldexp(clean, shift)
        on_grid = np.isfinite(scaled) & (scaled == np.floor(scaled))
        if not on_grid.all():  # finer grids: rescale the slots concerned (or widen them)
            need = np.zeros(len(g.slots), dtype=np.int64)
            group_of = np.repeat(np.arange(len(g.slots)), g.counts)
            off = np.flatnonzero(~on_grid)
            ks = np.array([_ratio(x)[1] for x in clean[off].tolist()], dtype=np.int64)
            np.maximum.at(need, group_of[off], ks)
            for j in np.flatnonzero(need > track.shift[g.slots]).tolist():
                s = int(g.slots[j])
                track.rescale(s, int(need[j]), int(self.start[s]), int(self.end[s]))
            shift = np.repeat(track.shift[g.slots], g.counts)
            with np.errstate(over="ignore"):
                scaled = np.ldexp(clean, shift)
        h0, l0, v0, b0 = self._before(track, self.end[g.slots])
        kept = track.shift[g.slots] >= 0  # (per slot: not wide)
        keep = np.repeat(kept, g.counts)
        scaled = np.where(keep, scaled, 0.0)
        h0, l0 = np.where(kept, h0, 0), np.where(kept, l0, 0)  # (a wide slot's limbs: anything)
        # th = floor(term / 2**48) is exact (a power-of-two scaling of an integer >= 1 in magnitude: normal), and
        # so is tl = term - th * 2**48: the exact difference is an integer in [0, 2**48) that is a multiple of the
        # term's ulp (th * 2**48 is one too), hence a double, and IEEE subtraction returns a representable
        # exact result exactly. Below, |th| < 2**61: both convert to int64 exactly.
        th = np.floor(np.ldexp(scaled, -_LIMB))
        # the running sums of th stay below 2**62 (with the base and the carries: at most 2 per event) when the
        # batch's total does; else per slot, widening the slots that might not (a float bound, 2**61 for margin;
        # it widens the slot of any term of 2**109 or more, or beyond the float range once scaled: inf)
        if float(np.abs(h0).max()) + float(np.abs(th).sum()) + 2 * len(v) >= 2.0**61:
            bound = np.add.reduceat(np.abs(th), g.heads) + np.abs(h0).astype(np.float64) + 2 * g.counts
            over = bound >= 2.0**61
            for s in g.slots[over].tolist():
                track.widen(s)
            kept &= ~over
            keep = np.repeat(kept, g.counts)
            scaled, th = np.where(keep, scaled, 0.0), np.where(keep, th, 0.0)
            h0, l0 = np.where(kept, h0, 0), np.where(kept, l0, 0)
        tl = (scaled - np.ldexp(th, _LIMB)).astype(np.int64)
        # tl's running sums in two 24-bit halves: each stays below 2**63 for any number of events per slot
        mid = _group_cumsum(tl >> 24, g)
        low = _group_cumsum(tl & 0xFFFFFF, g) + np.repeat(l0, g.counts) + ((mid & 0xFFFFFF) << 24)
        track.hi[g.pos_sorted] = (_group_cumsum(th.astype(np.int64), g) + np.repeat(h0, g.counts) + (mid >> 24)
                                  + (low >> _LIMB))
        track.lo[g.pos_sorted] = low & _LOW
        track.valid[g.pos_sorted] = _group_cumsum(valid.astype(np.int64), g) + np.repeat(v0, g.counts)
        track.bad[g.pos_sorted] = _group_cumsum((valid & ~finite).astype(np.int64), g) + np.repeat(b0, g.counts)

    # --- single events ----------------------------------------------------------------------------------------
    def insert(self, slot: int, t: int, values: Mapping[str, float], seq: int, event_id: str | None = None) -> int:
        """Add one event to a slot after every stored event at or before ``t`` (an append when it is the newest);
        returns its position. The entries after it move up one (their prefixes grow by its terms)."""
        ends = self.end_view
        end = ends[slot]
        if end < self.cap_view[slot] and (end == self.start_view[slot] or self.t_view[end - 1] <= t):
            # the usual case, the newest event of a state with room: writes through the memoryviews
            self.t_view[end] = t
            self.seq_view[end] = seq
            self.ids[end] = event_id  # (its label: 0.0, not arrived, as every room row holds)
            ends[slot] = end + 1
            self.live += 1
            views = self.value_views
            prev = end - 1
            for c, track in self.tracks.items():
                v = float(values.get(c, math.nan))
                views[c][end] = v
                if v == v and v not in _INFINITIES:
                    n, den = v.as_integer_ratio()  # (_ratio without the call)
                    k = den.bit_length() - 1
                    shift = track.shift_view[slot]
                    if k <= shift:  # on the slot's grid (never for a wide slot: its shift is -1)
                        lo = track.lo_view[prev] + (n << (shift - k))  # (the term added to lo, then carried)
                        h = track.hi_view[prev] + (lo >> _LIMB)
                        if -_HI_MAX < h < _HI_MAX:
                            track.hi_view[end] = h
                            track.lo_view[end] = lo & _LOW
                            track.valid_view[end] = track.valid_view[prev] + 1
                            track.bad_view[end] = track.bad_view[prev]
                            continue
                track.hi_view[end] = track.lo_view[end] = 0  # (a placeholder a rescale can shift)
                self._put(track, slot, end, v, end + 1)
            if self.late_view[slot] != NEVER:  # a label track to keep: a zero label adds nothing, counts valid
                labels = self.labels
                labels.hi_view[end] = labels.hi_view[prev]
                labels.lo_view[end] = labels.lo_view[prev]
                labels.valid_view[end] = labels.valid_view[prev] + 1
                labels.bad_view[end] = labels.bad_view[prev]
            return end
        start = int(self.start[slot])
        if end >= int(self.cap[slot]):
            if start - 1 - int(self.base[slot]) > (end - start) // 2:  # half as much room as rows, or more
                self._shift_back(slot)
            else:
                self._move_one(slot, max(2 * (end - start + 1), _MIN_ROOM))
            end, start = int(self.end[slot]), int(self.start[slot])
        i = bisect_right(self.t_view, t, start, end) if end > start and self.t_view[end - 1] > t else end
        if i < end:
            for a in self._row_arrays():
                a[i + 1:end + 1] = a[i:end]
        self.t[i] = t
        self.seq[i] = seq
        self.ids[i] = event_id
        self.label[i] = 0.0
        self.label_at[i] = NO_LABEL_AT
        for track in self._all_tracks():
            track.hi[i] = track.lo[i] = 0  # (a placeholder a rescale can shift: set by _put below)
        self.end[slot] = end + 1
        self.live += 1
        for c in self.columns:
            v = float(values.get(c, math.nan))
            self.values[c][i] = v
            self._put(self.tracks[c], slot, i, v, end + 1)
        if self.late_view[slot] != NEVER:
            self._put(self.labels, slot, i, 0.0, end + 1)
        return i

    def _put(self, track: Track, slot: int, i: int, v: float, end: int) -> None:
        """Entry ``i`` of a slot's track is new with value ``v``; entries ``(i, end)`` hold the old prefixes."""
        term, ok, bad = self._term(track, slot, v)  # (first: a rescale moves the previous prefix too)
        track.valid[i] = int(track.valid[i - 1]) + ok
        track.bad[i] = int(track.bad[i - 1]) + bad
        if track.shift_view[slot] != WIDE:
            track.put(slot, i, term)  # (may widen the slot)
        if i + 1 < end and track.shift_view[slot] != WIDE:
            track.add(slot, i + 1, end, term)
        if i + 1 < end:
            if ok:
                track.valid[i + 1:end] += ok
            if bad:
                track.bad[i + 1:end] += bad

    def _term(self, track: Track, slot: int, v: float) -> tuple[int, int, int]:
        """(scaled term, valid, bad) of one value on the slot's grid, rescaling the slot first when needed."""
        if v != v:
            return 0, 0, 0
        if v in (math.inf, -math.inf):
            return 0, 1, 1
        n, k = _ratio(v)
        shift = int(track.shift[slot])
        if shift == WIDE:
            return 0, 1, 0  # (its limbs are not kept)
        if k > shift:
            track.rescale(slot, k, int(self.start[slot]), int(self.end[slot]))
            if track.shift_view[slot] == WIDE:
                return 0, 1, 0
            shift = k
        return n << (shift - k), 1, 0

    def set_label(self, slot: int, i: int, label: float, at: int) -> None:
        """Entry ``i`` of ``slot`` now has ``label``, known from ``at``: every later prefix of the label track
        changes by the difference (the track is built first if this is the slot's first non-zero label)."""
        old = float(self.label[i])
        self.label[i] = label
        self.label_at[i] = at
        if label != 0.0:
            if self.late_view[slot] == NEVER:
                self._label_track(np.array([slot], dtype=np.int64))
            self.late[slot] = max(int(self.late[slot]), at if math.isfinite(label) else NONFINITE)
        elif self.late_view[slot] == NEVER:  # still only zero labels: no track to keep
            return
        track = self.labels
        end = int(self.end[slot])
        b, ok_b, bad_b = self._term(track, slot, label)  # (first: the old value is on any finer grid too)
        a, ok_a, bad_a = self._term(track, slot, old)
        if a != b and track.shift_view[slot] != WIDE:
            track.add(slot, i, end, b - a)
        if ok_a != ok_b:
            track.valid[i:end] += ok_b - ok_a
        if bad_a != bad_b:
            track.bad[i:end] += bad_b - bad_a

    def _label_track(self, slots: np.ndarray) -> None:
        """Build the label track of slots holding only zero labels (``late == NEVER``: not kept until now), header
        row included: every prefix sums to 0 on the coarsest grid and counts its entries valid."""
        if not len(slots):
            return
        start, end = self.start[slots], self.end[slots]
        rows, _ = _spans(start - 1, start - 1, end - start + 1)
        track = self.labels
        track.hi[rows] = 0
        track.lo[rows] = 0
        track.valid[rows] = rows - np.repeat(start - 1, end - start + 1)
        track.bad[rows] = 0
        track.shift[slots] = 0

    def find(self, slot: int, event_id: str) -> int | None:
        """The position of ``event_id`` in a slot's region, or None."""
        start, end = int(self.start[slot]), int(self.end[slot])
        hits = np.flatnonzero(self.ids[start:end] == event_id)
        return start + int(hits[0]) if len(hits) else None

    # --- pruning ----------------------------------------------------------------------------------------------
    def prune(self, slots: np.ndarray, before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drop each slot's entries with time <= its ``before`` (distinct slots); returns the dropped positions'
        (first, stop) per slot (read their ids and seqs before the next append)."""
        slots = np.asarray(slots, dtype=np.int64)
        first = self.start[slots].copy()
        k = self.bisect_right(first, self.end[slots], np.asarray(before, dtype=np.int64))
        self.start[slots] = k  # (the row before k, the new header, holds the prefix of what was dropped)
        dropped = int((k - first).sum())
        self.live -= dropped
        self.held -= dropped
        return first, k

    def prune_one(self, slot: int, before: int) -> tuple[int, int]:
        """:meth:`prune` of one slot, on plain Python ints."""
        first = self.start_view[slot]
        k = bisect_right(self.t_view, before, first, self.end_view[slot])
        self.start_view[slot] = k
        self.live -= k - first
        self.held -= k - first
        return first, k

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """The positions of the given slots' entries (each region in order, slot after slot)."""
        slots = np.asarray(slots, dtype=np.int64)
        return _spans(self.start[slots], self.start[slots], self.end[slots] - self.start[slots])[0]

    # --- queries ----------------------------------------------------------------------------------------------
    def bisect_right(self, lo: np.ndarray, hi: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Per query, the first position ``i`` in ``[lo, hi)`` with ``t[i] > x`` (``hi`` if none); each region's
        times are sorted. A binary search for every query at once (about log2 of the longest range steps)."""
        lo = np.array(lo, dtype=np.int64)
        hi = np.array(hi, dtype=np.int64)
        t = self.t
        active = np.flatnonzero(lo < hi)
        while len(active):
            a, b = lo[active], hi[active]
            mid = (a + b) >> 1
            right = t[mid] <= x[active]
            lo[active] = np.where(right, mid + 1, a)
            hi[active] = np.where(right, b, mid)
            active = active[lo[active] < hi[active]]
        return lo

    def region_bisect(self, slot: int, x: int, lo: int | None = None, hi: int | None = None) -> int:
        """:meth:`bisect_right` of one query in a slot's region (or ``[lo, hi)`` of it), on plain Python ints."""
        return bisect_right(self.t_view, x, int(self.start[slot]) if lo is None else lo,
                            int(self.end[slot]) if hi is None else hi)

    def sums(self, track: Track, u: np.ndarray, lo: np.ndarray, hi: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query (slot ``u``, region positions ``[lo, hi)``): the exact sum of the track's values rounded once
        (float64; 0.0 for none), the valid count and the infinity count. Raises OverflowError for a sum beyond the
        float range (as ``math.fsum``)."""
        a, b = hi - 1, lo - 1
        d_hi = track.hi[a] - track.hi[b]  # (|hi| < 2**62: no overflow)
        d_lo = track.lo[a] - track.lo[b]
        shift = track.shift[u]
        # d_hi and d_lo are exact doubles while |d_hi| < 2**53 (|d_lo| < 2**48), and d_hi * 2**48 too: their sum
        # is the exact difference D rounded once. Scaling by 2**-shift is exact while the result is a normal
        # double (or 0: D == 0, +0.0), so the total is D / 2**shift correctly rounded, as Python's int division.
        x = d_hi.astype(np.float64) * float(1 << _LIMB) + d_lo
        total = np.ldexp(x, -shift)
        rest = (shift < 0) | ((x != 0.0) & ~((np.abs(d_hi) < 2**53) & (np.abs(total) >= _TINY)))
        valid = track.valid[a] - track.valid[b]
        bad = track.bad[a] - track.bad[b]
        if rest.any():  # wide slots (scan), and what the doubles cannot prove: the exact Python-int path
            for j in np.flatnonzero(rest).tolist():
                total[j] = self.sum_one(track, int(u[j]), int(lo[j]), int(hi[j]))[0]
        return total, valid, bad

    def sum_one(self, track: Track, slot: int, lo: int, hi: int) -> tuple[float, int, int]:
        """:meth:`sums` of one query, on plain Python values."""
        valid, bad = track.valid_view, track.bad_view
        counts = valid[hi - 1] - valid[lo - 1], bad[hi - 1] - bad[lo - 1]
        shift = track.shift_view[slot]
        if shift == WIDE:  # the limbs are not kept: the window's finite values, summed exactly once
            values = self.label if track.name is None else self.values[track.name]
            return math.fsum(v for v in values[lo:hi].tolist() if v - v == 0.0), *counts
        return track.between(hi - 1, lo - 1) / (1 << shift), *counts


class Plan(Protocol):
    """What :func:`window_group` reads of a window group (``online._GroupPlan``)."""

    delay_ns: int
    window_ns: int
    zero_delay: bool
    include_current: bool
    items: tuple[tuple[str, str, str | None, bool], ...]


def window_group(pool: Pool, slot: int, plan: Plan, t: int, current: Mapping[str, float] | None, own: int | None,
                 out: dict[str, float], scaled: dict[str, tuple[int, int] | None] | None = None) -> None:
    """Window features sharing one window (same delay, length, include_current) for an event at ``t`` on one
    state of a pool: ``online._window_group`` on the pool's arrays, the same numbers bit for bit.

    ``current`` is the event itself when it is not stored yet; ``own`` its position when it is. Counts, sums,
    means and label sums come from the exact prefix sums when the window holds no infinity (no NaN or
    infinite label for label sums, and every non-zero label arrived by ``t``); std, min and max and the rest
    scan the window. ``scaled`` caches the current event's values as ``(n, k)`` (NaN: None) across windows.
    """
    start, end = pool.start_view[slot], pool.end_view[slot]
    tv = pool.t_view
    edge = t - plan.delay_ns  # window_edges(): (t - delay - window, t - delay]
    if plan.zero_delay and own is not None:
        hi = own + 1 if plan.include_current else own
    else:
        hi = bisect_right(tv, edge, start, end)
    lo = bisect_right(tv, edge - plan.window_ns, start, end)
    if lo > hi:
        lo = hi
    with_current = current is not None and plan.zero_delay and plan.include_current
    count = hi - lo + 1 if with_current else hi - lo
    values: dict[str, list[float]] = {}
    label_total: float | None = None
    for name, aggregate, column, reads_label in plan.items:
        if aggregate == "count":
            out[name] = float(count)
            continue
        if column and (aggregate == "mean" or aggregate == "sum"):
            track = pool.tracks[column]
            bad = track.bad_view
            shift = track.shift_view[slot]
            # no infinity in the window, limbs kept (not wide): the exact prefix sums
            a, b = hi - 1, lo - 1
            if bad[a] == bad[b] and shift != WIDE and EXACT:
                total = track.between(a, b)
                pvalid = track.valid_view
                valid = pvalid[a] - pvalid[b]
                term = None
                if with_current:
                    if scaled is None:
                        scaled = {}
                    if column not in scaled:
                        v = current.get(column, math.nan)  # type: ignore[union-attr]
                        scaled[column] = (None if v != v else _INFINITE if v in _INFINITIES else _ratio(v))
                    term = scaled[column]
                if term is not _INFINITE:  # (an infinite current value: the scanning path below)
                    if term is not None:
                        n, k = term
                        if k > shift:
                            total <<= k - shift
                            shift = k
                        total += n << (shift - k)
                        valid += 1
                    value = total / (1 << shift) if total else 0.0
                    if aggregate == "mean":
                        out[name] = value / valid if valid > 0 else math.nan
                    else:
                        out[name] = value if valid else 0.0
                    continue
        total_f = m2 = mn = mx = 0.0
        valid = 0
        if column:  # the scanning path: std, min, max, and sums over a window holding infinities
            if column not in values:
                window = [v for v in pool.values[column][lo:hi].tolist() if v == v]  # v == v drops NaN
                if with_current:
                    v = current.get(column, math.nan)  # type: ignore[union-attr]
                    if v == v:
                        window.append(v)
                values[column] = window
            vals = values[column]
            valid = len(vals)
            if aggregate in ("sum", "mean"):
                total_f = math.fsum(vals)
            elif aggregate == "std" and valid:
                mean = math.fsum(vals) / valid
                m2 = math.fsum((v - mean) ** 2 for v in vals)
            elif aggregate == "min" and valid:
                mn = min(vals)
            elif aggregate == "max" and valid:
                mx = max(vals)
        if reads_label and label_total is None:
            labels = pool.labels
            late = pool.late_view[slot]
            if late == NEVER:
                label_total = 0.0  # only zero labels
            elif t >= late and late != NONFINITE and labels.shift_view[slot] != WIDE and EXACT:
                exact = labels.between(hi - 1, lo - 1)
                label_total = exact / (1 << labels.shift_view[slot]) if exact else 0.0
            else:
                label_total = math.fsum(
                    y for y, at in zip(pool.label[lo:hi].tolist(), pool.label_at[lo:hi].tolist(), strict=True)
                    if at <= t
                )
        if aggregate == "label_rate":
            out[name] = float(label_total or 0.0) / count if count > 0 else 0.0
            continue
        out[name] = finish_aggregate(aggregate, count, valid, total_f, m2, mn, mx, label_total or 0.0)


def window_edges(pool: Pool, offsets: Iterable[int], u: np.ndarray, t: np.ndarray, pos: np.ndarray
                 ) -> dict[int, np.ndarray]:
    """Per offset, each stored event's ``bisect_right`` of ``t - offset`` in its region before its own position
    (slots ``u``, times ``t``, positions ``pos``): the window edges of :func:`window_columns` for every window
    group of a pool in one vectorised search. Offsets are positive and ``t - offset`` must fit in int64."""
    offsets = list(offsets)
    if not offsets:
        return {}
    k, n = len(offsets), len(u)
    start = pool.start[u]
    x = (t[None, :] - np.array(offsets, dtype=np.int64)[:, None]).ravel()
    found = pool.bisect_right(np.tile(start, k), np.tile(pos, k), x).reshape(k, n)
    return dict(zip(offsets, found, strict=True))


def window_columns(pool: Pool, plan: Plan, u: np.ndarray, t: np.ndarray, pos: np.ndarray,
                   out: dict[str, np.ndarray], edges: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """:func:`window_group` of stored events (slots ``u``, times ``t``, positions ``pos``) for all of them at once:
    counts, sums, means and label sums from the exact prefix sums, each ``out[name]`` a float64 column. Returns
    the events those do not cover (a window holding an infinity, labels that arrived after the event or NaN/inf
    labels, std/min/max): their columns are left unset, for :func:`window_group` per event.

    The batch path appends a batch's events first (:meth:`Pool.append`), then computes every event's windows at
    its own position: the later events of its state lie after it in time order and no window reaches them.
    ``edges``: :func:`window_edges` of the plan's offsets (``delay`` unless 0, ``delay + window``), else they are
    searched here.
    """
    n = len(u)
    missed = np.zeros(n, dtype=bool) if EXACT else np.ones(n, dtype=bool)
    if edges is None:
        edges = window_edges(pool, {plan.delay_ns + plan.window_ns} | ({plan.delay_ns} - {0}), u, t, pos)
    # (a delayed window's end is searched before the event's own position: the later events are after it)
    hi = (pos + 1 if plan.include_current else pos) if plan.zero_delay else edges[plan.delay_ns]
    # (searched before the event's own position: nothing there is at or before an earlier time than its own)
    lo = np.minimum(edges[plan.delay_ns + plan.window_ns], hi)
    count = hi - lo
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    label_total: np.ndarray | None = None
    for name, aggregate, column, reads_label in plan.items:
        if aggregate == "count":
            out[name] = count.astype(np.float64)
        elif column and aggregate in ("sum", "mean"):
            if column not in sums:
                total, valid, bad = pool.sums(pool.tracks[column], u, lo, hi)
                missed |= bad > 0
                sums[column] = total, valid
            total, valid = sums[column]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[name] = (np.where(valid > 0, total / valid, math.nan) if aggregate == "mean"
                             else np.where(valid > 0, total, 0.0))
        elif reads_label and aggregate in ("label_count", "label_rate"):
            if label_total is None:
                late = pool.late[u]
                label_total = np.zeros(n, dtype=np.float64)
                exact = np.flatnonzero((late != NEVER) & (t >= late) & (late != NONFINITE))
                if len(exact):
                    label_total[exact] = pool.sums(pool.labels, u[exact], lo[exact], hi[exact])[0]
                missed |= (late != NEVER) & ((t < late) | (late == NONFINITE))
            with np.errstate(divide="ignore", invalid="ignore"):
                out[name] = (np.where(count > 0, label_total / count, 0.0) if aggregate == "label_rate"
                             else label_total.copy())
        else:  # std, min, max (and anything else): per event
            missed[:] = True
    return missed


_INFINITIES = (math.inf, -math.inf)
_INFINITE = (0, -1)  # scaled[column] of an infinite current value: its windows scan


class _Groups:
    """A batch's events sorted by slot: ``order`` (sorted -> batch index), each slot's first sorted index
    (``heads``), event count, slot, each sorted event's rank within its slot and position."""

    __slots__ = ("counts", "heads", "order", "pos_sorted", "rank_sorted", "slots")

    def __init__(self, order: np.ndarray, heads: np.ndarray, counts: np.ndarray, slots: np.ndarray,
                 pos_sorted: np.ndarray) -> None:
        self.order, self.heads, self.counts, self.slots, self.pos_sorted = order, heads, counts, slots, pos_sorted
        self.rank_sorted = np.arange(len(order), dtype=np.int64) - np.repeat(heads, counts)


def _spans(src_first: np.ndarray, dst_first: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of spans ``[src_first, src_first + size)`` and where each goes (``dst_first`` on)."""
    n = int(size.sum())
    within = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(size) - size, size)
    return np.repeat(src_first, size) + within, np.repeat(dst_first, size) + within


def _group_cumsum(terms: np.ndarray, g: _Groups) -> np.ndarray:
    """Running sums of ``terms`` (sorted by slot) restarting at each slot's first event (inclusive)."""
    total = np.cumsum(terms)
    before = total[g.heads] - terms[g.heads]
    return total - np.repeat(before, g.counts)


__all__ = ["NEVER", "NONFINITE", "NO_LABEL_AT", "WIDE", "Plan", "Pool", "Track", "window_columns", "window_edges",
           "window_group"]

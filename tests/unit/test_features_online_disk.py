"""What the online store keeps on disk: rows by seq without a per-entity index, deletes as housekeeping, and loads
that prune exactly as memory did, so a reopened store answers like the one that wrote it."""

from __future__ import annotations

import shutil
import sqlite3
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.features.definitions import resolve_definitions
from keel.features.online import OnlineStore, stored_rows
from keel.spec import Data, Features

BASE = pd.Timestamp("2024-03-01 00:00:00")
DEFS = resolve_definitions(
    Features.model_validate(
        {
            "windows": [
                {"entity": "card", "aggregates": ["count", "mean"], "column": "amount", "windows": ["1h"]},
                {"entity": "shop", "aggregates": ["count", "label_count"], "windows": ["1h"], "delay": "30m"},
            ]
        }
    ),
    Data.model_validate({"source": "x", "timestamp": "ts", "label": "y", "id_column": "id"}),
)


def open_store(path: Path) -> OnlineStore:
    return OnlineStore(path, DEFS, timestamp="ts", label="y", id_column="id")


def event(i: int, minute: int, card: int = 1, shop: int = 2, amount: float = 1.0) -> dict:
    return {"id": i, "ts": BASE + timedelta(minutes=minute), "card": card, "shop": shop, "amount": amount}


def rows_on_disk(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return [row[1:5] for row in stored_rows(db)]


def answers(store: OnlineStore, probes: list[dict]) -> np.ndarray:
    return store.features_many(probes).matrix


def test_an_event_pruned_before_its_commit_is_never_written_and_written_ones_are_deleted(tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    with open_store(path) as store:
        store.stage(event(1, 0))
        store.stage(event(2, 200))  # 1 h 40 min later: event 1 leaves both 1 h (+30 min) windows in memory
        assert store.commit_staged() == 2  # event 2's two rows; event 1's rows are never written
        assert {r[2] for r in rows_on_disk(path)} == {"2"}
        store.update(event(3, 400))  # event 2 is pruned now: its rows are deleted with the next commit
        store.stage(event(4, 600))  # staged: event 3's rows are deleted after the inserts of event 4
        store.commit_staged()
        assert {r[2] for r in rows_on_disk(path)} == {"2", "3", "4"}  # fewer than DELETE_ROWS deletes: they wait
        store.commit_staged(deletes=True)
        assert {r[2] for r in rows_on_disk(path)} == {"4"}
        store.stage(event(5, 800))
        store.commit_staged()
    assert {r[2] for r in rows_on_disk(path)} == {"5"}  # close writes the deletes still due


def test_deletes_go_with_the_commit_once_enough_are_due(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(OnlineStore, "DELETE_ROWS", 4)
    path = tmp_path / "s.sqlite"
    with open_store(path) as store:
        for i in range(4):
            store.stage(event(i, 200 * i, card=i))  # each event prunes the shop's one before it
            store.commit_staged()
        assert len(rows_on_disk(path)) == 4 + 4  # 3 shop rows due: they wait
        store.stage(event(9, 1000, card=9))
        assert store.commit_staged() == 2 + 4  # 4 due: written with this commit's inserts
        assert sorted(r[2] for r in rows_on_disk(path) if r[0] == "shop") == ["9"]


def test_rows_left_on_disk_are_pruned_on_load_and_their_labels_wait_for_their_events(tmp_path) -> None:
    """A crash between a commit and its deletes leaves old rows behind: loading prunes them as memory did, and
    a label of such an event is found again if the event is sent again."""
    path = tmp_path / "s.sqlite"
    history = [event(i, 10 * i, card=i % 2, shop=i % 3, amount=0.5 * i) for i in range(30)]
    with open_store(path) as store:
        store.update_many(history)
        store.add_label(3, 1, BASE)
    with sqlite3.connect(path) as db:  # put back rows of events memory pruned long ago
        db.executemany(
            "insert into events (entity, key, event_id, t, vals) values (?, ?, ?, ?, ?)",
            [("card", "1", "3", int((BASE + timedelta(minutes=30)).value), '{"amount": 99.0}'),
             ("shop", "0", "3", int((BASE + timedelta(minutes=30)).value), "{}")],
        )
    probes = [event(100 + k, 300 + k, card=k % 2, shop=k % 3) for k in range(4)]
    resent = event(3, 290, card=1, shop=0)
    with open_store(tmp_path / "clean.sqlite") as clean:
        clean.update_many(history)
        clean.add_label(3, 1, BASE)
        want = answers(clean, probes)
        clean.update(resent)
        want_after = answers(clean, probes)
    for preload in (True, False):
        copy = tmp_path / f"copy-{preload}.sqlite"
        shutil.copy(path, copy)
        with open_store(copy) as reopened:
            if preload:
                reopened.preload()
            assert np.array_equal(answers(reopened, probes), want, equal_nan=True)
            assert reopened._pending == {"3": (1.0, int(BASE.value))}  # its rows were pruned: it waits
            reopened.update(resent)
            assert np.array_equal(answers(reopened, probes), want_after, equal_nan=True)
        assert ("card", "1", "3", int((BASE + timedelta(minutes=30)).value)) not in rows_on_disk(copy)


def test_a_store_written_with_the_per_entity_index_opens_and_answers_the_same(tmp_path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the earlier layout: autoincrement seq and an (entity, key, t) index
        db.executescript(
            "create table events (seq integer primary key autoincrement, entity text not null, key text not null,"
            " event_id text, t integer not null, vals text not null);"
            "create index events_by_entity on events (entity, key, t);"
        )
    history = [event(i, 7 * i, card=i % 3, amount=float(i)) for i in range(40)]
    probes = [event(100 + k, 290 + k, card=k % 3) for k in range(3)]
    with open_store(path) as old, open_store(tmp_path / "new.sqlite") as new:
        for s in (old, new):
            s.update_many(history[:20])
            for e in history[20:]:
                s.stage(e)
            s.commit_staged()
        assert np.array_equal(answers(old, probes), answers(new, probes), equal_nan=True)
    with sqlite3.connect(path) as db:
        assert db.execute("select name from sqlite_master where type = 'index' and tbl_name = 'events'"
                          ).fetchall() == []
    with open_store(path) as old, open_store(tmp_path / "new.sqlite") as new:
        assert np.array_equal(answers(old, probes), answers(new, probes), equal_nan=True)
        assert old.entity_count() == new.entity_count() == 3 + 1  # three cards, one shop


def test_commits_leave_the_log_checkpoint_to_a_background_thread(tmp_path, monkeypatch) -> None:
    """A service commits on its event loop: SQLite's own checkpoint inside a commit stalled requests (up to 22 ms);
    the store's thread copies the log into the database file instead, and nothing is lost either way."""
    import os
    import time

    path = tmp_path / "s.sqlite"
    store = open_store(path)
    store.features_many([event(i, i) for i in range(40)], stage=True)
    store.commit_staged()
    assert store._writer.execute("pragma wal_autocheckpoint").fetchone()[0] == 0
    busy, log_pages, copied = store.checkpoint()
    assert busy == 0 and log_pages > 0 and copied == log_pages  # the commit left its pages in the log

    monkeypatch.setattr(OnlineStore, "CHECKPOINT_ROWS", 10)
    other = open_store(tmp_path / "t.sqlite")
    size = os.path.getsize(tmp_path / "t.sqlite")
    other.features_many([event(i, i, card=i) for i in range(200)], stage=True)
    other.commit_staged()
    deadline = time.monotonic() + 10
    while os.path.getsize(tmp_path / "t.sqlite") <= size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.getsize(tmp_path / "t.sqlite") > size  # the thread copied the rows into the database file
    other.close()
    store.close()
    assert len(rows_on_disk(path)) == 80  # 40 events x 2 entities, none old enough to prune
    cards = [row for row in rows_on_disk(tmp_path / "t.sqlite") if row[0] == "card"]
    assert len(cards) == 200  # one card each: none pruned, every staged row on disk


def test_two_stores_writing_one_file_take_their_own_seqs_and_lose_no_event(tmp_path) -> None:
    """Each store reserves a range of seqs in the file when it first needs one, so two stores of one file never
    write the same seq, by rows or blocks, in any order; a store opened after sees every event; a reservation
    taken in a transaction that rolls back is taken again."""
    for block_first in (True, False):
        path = tmp_path / f"s-{block_first}.sqlite"
        blocks, rows = open_store(path), open_store(path)
        batch = [event(i, i, card=i % 3, shop=i % 4) for i in range(40)]
        blocks.features_many(batch, stage=True)  # one block per entity
        rows.stage(event(500, 50, card=1))
        if block_first:
            assert blocks.commit_staged() == 80
            assert rows.commit_staged() == 2
        else:
            assert rows.commit_staged() == 2
            assert blocks.commit_staged() == 80
        with sqlite3.connect(path) as db:
            stored = stored_rows(db)
        seqs = [row[0] for row in stored]
        assert len(seqs) == len(set(seqs)) == 82
        assert sorted(int(row[3]) for row in stored if row[1] == "card") == [*range(40), 500]
        blocks.close()
        rows.close()
        probe = [event(10**6, 60, card=1)]
        with open_store(path) as again:
            assert again.features_many(probe).matrix[0, 0] == 13 + 1 + 1  # card 1's batch events, 500, the probe
            again.stage(event(501, 61, card=1))
            again.commit_staged()
            with sqlite3.connect(path) as db:
                assert max(seqs) < max(row[0] for row in stored_rows(db))  # a reopened store's seqs come after
    path = tmp_path / "rollback.sqlite"
    with open_store(path) as store:
        try:
            with store.transaction():
                store.update(event(1, 0))
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        other = open_store(path)  # reserves the range the rolled-back one had
        other.update_many([event(2, 1), event(4, 3)])
        store.update(event(3, 2))
        other.close()
    with sqlite3.connect(path) as db:
        seqs = [row[0] for row in stored_rows(db)]
    assert len(seqs) == len(set(seqs)) == 6


def test_large_commits_write_every_row_as_the_single_event_path_does(tmp_path) -> None:
    """A commit of more rows than one INSERT statement takes (full statements, then the rest one by one): the
    same rows, seqs and value texts as events staged one by one and committed a few rows at a time."""
    rng = np.random.default_rng(11)
    amounts = [1.0, 57.16, np.nan, 0.1, -0.0, 1e-300, 123456.789]
    events = [event(i, i // 7, int(rng.integers(0, 40)), int(rng.integers(0, 40)), amounts[i % len(amounts)])
              for i in range(400)]  # 800 rows: five statements of 150 rows, then 50 rows
    big, small = tmp_path / "big.sqlite", tmp_path / "small.sqlite"
    with open_store(big) as store:
        for e in events:
            store.stage(e)
        assert store.commit_staged() == 800
    with open_store(small) as store:
        for e in events:
            store.stage(e)
            store.commit_staged()
    with sqlite3.connect(big) as a, sqlite3.connect(small) as b:
        query = "select seq, entity, key, event_id, t, vals from events order by seq"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_value_texts_of_a_batch_are_the_json_of_each_events_values(tmp_path) -> None:
    """The commit's value texts for a block of columns: json.dumps of each event's values (NaN as null), with
    and without a NaN in the block."""
    import json

    with open_store(tmp_path / "s.sqlite") as store:
        for column in ([1.0, 57.16, -0.0, 1e-300, 1e22, 0.1 + 0.2], [2.5, np.nan, 3.0]):
            want = [json.dumps({"amount": None if v != v else v}) for v in column]
            assert store._vals_texts("card", [column], len(column)) == want
            assert [store._vals_text("card", {"amount": v}) for v in column] == want
        assert store._vals_texts("shop", [], 2) == ["{}", "{}"]


def test_a_commit_with_thousands_of_deletes_leaves_exactly_the_rows_memory_holds(tmp_path) -> None:
    """Every state dropped at once (events 3 h later than a 1 h horizon): the commit deletes more rows than one
    DELETE statement takes, and the file then holds exactly the rows of the events memory holds."""
    path = tmp_path / "s.sqlite"
    rng = np.random.default_rng(12)
    with open_store(path) as store:
        for start in (0, 180):
            batch = [event(start * 1000 + i, start + i // 20, int(rng.integers(0, 30)), int(rng.integers(0, 30)))
                     for i in range(1000)]
            store.features_many(batch, stage=True)
            store.commit_staged(deletes=True)
        held = {seq for pool in store._pools.values() for seq in pool.seq[pool.rows(np.arange(len(pool.keys)))].tolist()}
        with sqlite3.connect(path) as db:
            on_disk = {row[0] for row in stored_rows(db)}
        assert on_disk == held
        assert min(held) > 2000  # the first batch's 2,000 rows were deleted in one commit


def test_the_log_restarts_though_commits_land_while_it_is_checkpointed(tmp_path, monkeypatch) -> None:
    """Under steady traffic a commit lands while the background checkpoint copies the log, so SQLite found it never
    wholly copied and never restarted it (88 MB after 20,000 single events). Past WAL_RESTART_PAGES the thread
    copies those last pages holding the writer's lock, and the next commit writes the log from its start."""
    import keel.features.online as online

    monkeypatch.setattr(OnlineStore, "WAL_RESTART_PAGES", 1)
    path = tmp_path / "s.sqlite"
    store = open_store(path)
    store.features_many([event(i, i, card=i) for i in range(50)], stage=True)
    store.commit_staged()
    bulk = online._passive_checkpoint
    landed = []

    def commit_meanwhile(db: sqlite3.Connection) -> tuple[int, int, int]:
        if landed:
            return bulk(db)
        # A commit lands while the bulk is copied: a reader's snapshot keeps the copy short of its pages.
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("begin")
        reader.execute("select count(*) from events").fetchone()
        landed.append(store.features_many([event(100, 100, card=100)], stage=True))
        store.commit_staged()
        done = bulk(db)
        reader.execute("commit")
        reader.close()
        assert done[2] < done[1]  # the bulk copy missed the page committed meanwhile
        return done

    monkeypatch.setattr(online, "_passive_checkpoint", commit_meanwhile)
    busy, pages, copied = store.checkpoint()
    assert landed and busy == 0 and copied == pages  # the page committed meanwhile was copied too
    monkeypatch.setattr(online, "_passive_checkpoint", bulk)
    before = bulk(store._db)[1]
    store.features_many([event(101, 101, card=101)], stage=True)
    store.commit_staged()
    after = bulk(store._db)[1]
    assert after < before  # the commit wrote the log from its start: it no longer holds the earlier pages
    store.close()
    assert len([row for row in rows_on_disk(path) if row[0] == "card"]) == 52


def held_seqs(store: OnlineStore) -> set[int]:
    """The seqs of every event row memory holds."""
    return {seq for pool in store._pools.values() for seq in pool.seq[pool.rows(np.arange(len(pool.keys)))].tolist()}


def same_answers_after_reopen(store: OnlineStore, tmp_path: Path, probes: list[dict]) -> None:
    """A copy of the store's file, reopened (preloaded or loaded on its first miss), answers ``probes`` as the
    store that wrote it does."""
    want = answers(store, probes)
    for preload in (True, False):
        copy = tmp_path / f"copy-{preload}.sqlite"
        shutil.copy(store.path, copy)
        for suffix in ("-wal", "-shm"):
            if Path(f"{store.path}{suffix}").exists():
                shutil.copy(f"{store.path}{suffix}", f"{copy}{suffix}")
        with open_store(copy) as reopened:
            if preload:
                reopened.preload()
            assert np.array_equal(answers(reopened, probes), want, equal_nan=True)


def test_a_batch_is_one_block_per_entity_and_reloads_bit_for_bit(tmp_path) -> None:
    """The batch path's rows reach the file as one block per entity (no row per event), and a reload gives back
    every value to the bit: -0.0, subnormals, 0.1 + 0.2, NaN."""
    amounts = [1.0, 57.16, np.nan, -0.0, 1e-300, 0.1 + 0.2, 1e22, 123456.789, 5e-324, -7.25]
    batch = [event(i, i // 4, card=i % 7, shop=i % 5, amount=amounts[i % len(amounts)]) for i in range(200)]
    path = tmp_path / "s.sqlite"
    with open_store(path) as store:
        store.features_many(batch, stage=True)
        assert store.commit_staged() == 400
        assert store.entity_count() == 12
        with sqlite3.connect(path) as db:
            assert db.execute("select entity, n from blocks order by first").fetchall() == [("card", 200),
                                                                                            ("shop", 200)]
            assert db.execute("select count(*) from events").fetchone()[0] == 0
        same_answers_after_reopen(store, tmp_path, [event(1000 + k, 60, card=k, shop=k) for k in range(7)])
    with open_store(path) as again:
        again.preload()
        pool = again._pools["card"]
        rows = pool.rows(np.arange(len(pool.keys)))
        got = dict(zip(pool.ids[rows].tolist(), pool.values["amount"][rows].tolist(), strict=True))
        assert len(got) == 200
        for e in batch:
            assert np.float64(got[str(e["id"])]).tobytes() == np.float64(e["amount"]).tobytes()


def test_blocks_memory_no_longer_needs_leave_the_file_and_thin_ones_are_written_again(tmp_path) -> None:
    """A block whose rows memory all dropped is deleted; one with at most a quarter of its stored rows left is
    written again with those alone (same seqs and values), and deleted once they are dropped too, by a batch or
    by single events; the file then holds exactly the rows memory holds, and a reopened copy answers the same at
    every step."""
    path = tmp_path / "s.sqlite"
    probes = [event(10**6 + k, 2000, card=k, shop=k % 3) for k in range(10)]
    with open_store(path) as store:
        odd = [1.0, 57.16, np.nan, -0.0, 1e-300, 0.1 + 0.2, 1e22, 5e-324, -7.25, 123456.789, 2.5]
        first = [event(i, i // 2, card=i % 10, shop=i % 3, amount=odd[i % len(odd)]) for i in range(100)]
        first[98]["id"] = 'quote " and \\ and é'  # (a card 8 event: its row is written again)
        store.features_many(first, stage=True)
        store.commit_staged()
        with sqlite3.connect(path) as db:
            before = {row[0]: row[1:] for row in stored_rows(db)}
        # 3 h later: cards 0-7 and every shop again; only cards 8 and 9 keep their 20 older events
        later = [event(1000 + i, 300 + i // 2, card=i % 8, shop=i % 3, amount=2.0) for i in range(80)]
        store.features_many(later, stage=True)
        store.commit_staged(deletes=True)
        with sqlite3.connect(path) as db:
            assert db.execute("select entity, n, json_array_length(rows), json_array_length(offs) from blocks"
                              " where first < 200").fetchall() == [("card", 100, 20, 20)]
            assert db.execute("select count(*) from events").fetchone()[0] == 0
            stored = stored_rows(db)
        assert {row[0] for row in stored} == held_seqs(store)
        assert [row[3] for row in stored if row[0] in before] == [str(e["id"]) for e in first if e["card"] >= 8]
        assert all(before[row[0]] == row[1:] for row in stored if row[0] in before)  # the same rows, to the text
        shutil.copy(path, tmp_path / "reload.sqlite")
        for suffix in ("-wal", "-shm"):
            if Path(f"{path}{suffix}").exists():
                shutil.copy(f"{path}{suffix}", tmp_path / f"reload.sqlite{suffix}")
        with open_store(tmp_path / "reload.sqlite") as again:  # the values written again, to the bit
            again.preload()
            pool = again._pools["card"]
            rows = pool.rows(np.arange(len(pool.keys)))
            got = dict(zip(pool.ids[rows].tolist(), pool.values["amount"][rows].tolist(), strict=True))
            assert [np.float64(got[str(e["id"])]).tobytes() for e in first if e["card"] >= 8] == [
                np.float64(e["amount"]).tobytes() for e in first if e["card"] >= 8]
        same_answers_after_reopen(store, tmp_path, probes)
        # card 8 again 3 h later, event by event: its 10 older events are dropped a few seqs at a time
        for i in range(5):
            store.stage(event(2000 + i, 600 + i, card=8, shop=0, amount=3.0))
            store.commit_staged(deletes=True)
        with sqlite3.connect(path) as db:
            # (10 of its 20 stored rows left: more than a quarter, so the block stays as it is; a load prunes them)
            assert db.execute("select json_array_length(offs) from blocks where first < 200").fetchall() == [(20,)]
        same_answers_after_reopen(store, tmp_path, probes)
        # card 9 too, as a batch: the block is empty and leaves the file
        store.features_many([event(3000 + i, 610 + i, card=9, shop=i % 3) for i in range(40)], stage=True)
        store.commit_staged(deletes=True)
        with sqlite3.connect(path) as db:
            assert db.execute("select count(*) from blocks where first < 200").fetchone()[0] == 0
            assert {row[0] for row in stored_rows(db)} == held_seqs(store)
        same_answers_after_reopen(store, tmp_path, probes)


def test_a_block_with_most_rows_alive_stays_and_a_load_prunes_its_dead_rows(tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    probes = [event(10**6 + k, 2000, card=k, shop=k % 3) for k in range(10)]
    with open_store(path) as store:
        store.features_many([event(i, i // 2, card=i % 10, shop=i % 3, amount=float(i)) for i in range(100)],
                            stage=True)
        store.commit_staged()
        store.features_many([event(1000 + i, 300 + i, card=i % 3, shop=i % 3) for i in range(40)], stage=True)
        store.commit_staged(deletes=True)  # cards 0-2 pruned: 70 of the card block's 100 rows alive
        with sqlite3.connect(path) as db:
            assert db.execute("select n from blocks where entity = 'card' and first < 200").fetchall() == [(100,)]
            assert len(held_seqs(store)) < len(stored_rows(db))
        same_answers_after_reopen(store, tmp_path, probes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), min_size=1, max_size=8), st.data())
def test_property_the_block_index_sorts_drops_into_blocks_and_rows(spans, data) -> None:
    """_Blocks against sets: which dropped seqs are rows of blocks (marked) and which are rows of the events
    table (returned in order), which blocks are dead or thin, for drops of a few seqs (the single-event path) and
    of many (a batch); and, commit after commit, what each thin block keeps and where those rows sit in what it
    stored until then."""
    from keel.features.online import _THIN, _Blocks

    index, model, sizes, stored, seq = _Blocks(), {}, {}, {}, 1
    for gap, n in spans:  # blocks with rows of the events table between them
        seq += gap
        index.add(seq, n)
        model[seq], sizes[seq], stored[seq] = set(range(seq, seq + n)), n, list(range(seq, seq + n))
        seq += n
    for _ in range(data.draw(st.integers(1, 4))):  # commits
        for _ in range(data.draw(st.integers(1, 3))):  # drops between two commits
            rnd = data.draw(st.randoms(use_true_random=False))  # any share of the seqs, in any order
            drops = rnd.sample(range(seq + 4), data.draw(st.integers(0, seq + 4)))
            in_blocks = {s for s in drops if any(first <= s < first + n for first, n in sizes.items())}
            assert index.drop(drops) == [s for s in drops if s not in in_blocks]
            for alive in model.values():
                alive -= set(drops)
            for first, alive in model.items():
                assert set(np.flatnonzero(index.alive[first]) + first) == alive
                assert index.count[first] == len(alive)
                assert (first in index.dead) == (not alive)
                assert (first in index.thin) == (0 < len(alive) * _THIN <= len(stored[first]))
        dead, thin = index.take()
        assert dead == sorted(f for f, alive in model.items() if not alive)
        want = [f for f in sorted(model) if model[f] and len(model[f]) * _THIN <= len(stored[f])]
        assert [(f, (keep + f).tolist()) for f, keep, _ in thin] == [(f, sorted(model[f])) for f in want]
        for f, keep, at in thin:  # each kept row's position in what the block stored
            assert at.tolist() == [stored[f].index(s) for s in (keep + f).tolist()]
            stored[f] = sorted(model[f])
            assert index.stored(f) == len(keep)
        for f in dead:
            del model[f], sizes[f], stored[f]
        assert not index.dead and not index.thin and set(index.firsts) == set(model)


def test_labels_of_events_gone_from_every_state_leave_the_file_with_the_commits_deletes(tmp_path) -> None:
    """A label its event held when the event left its last state is forgotten: deleted from the file with the
    next commit's deletes, after a batch as after single events. A label recorded for such an event later waits
    for it (it may be sent again), even one equal to the forgotten one: its pending delete is cancelled."""
    path = tmp_path / "s.sqlite"
    at = BASE + timedelta(minutes=41)
    with open_store(path) as store:
        store.features_many([event(i, i, card=i % 2, shop=i % 3) for i in range(40)], stage=True)
        store.commit_staged()
        for i in range(10):
            store.add_label(i, 1, at)
        # 3 h later, as a batch: every state moves past events 0-39 (horizons: card 1 h, shop 1 h 30)
        store.features_many([event(100 + i, 180 + i, card=i % 2, shop=i % 3) for i in range(40)], stage=True)
        assert store._pending == {}
        store.add_label(7, 0, at)  # the same time as the forgotten label, another value
        store.commit_staged(deletes=True)
        with sqlite3.connect(path) as db:
            assert dict(db.execute("select event_id, label from labels")) == {"7": 0.0}
        assert store._pending == {"7": (0.0, int(at.value))}
        store.add_label(100, 1, BASE + timedelta(minutes=221))  # card 0 and shop 0 hold event 100
        store.stage(event(200, 400, card=0, shop=0))  # one single event pushes it out of both
        store.commit_staged(deletes=True)
        with sqlite3.connect(path) as db:
            assert dict(db.execute("select event_id, label from labels")) == {"7": 0.0}
        assert "100" not in store._owners and store._pending == {"7": (0.0, int(at.value))}

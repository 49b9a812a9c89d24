"""The sharded store on its own: a model-based property test against a plain
dict, revision order as the sinks see it, TTL expiry and scans."""

from __future__ import annotations

import random
import threading
import zlib
from collections import Counter

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fluxkv.core.changes import ChangeRecord, Op
from fluxkv.core.store import NUM_SHARDS, SCAN_WORK_BUDGET, ScanPosition, Store, shard_of


class FakeClock:
    def __init__(self, now: int = 1_700_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.records: list[ChangeRecord] = []

    def append(self, record: ChangeRecord) -> None:
        self.records.append(record)


def full_scan(store: Store, prefix: str = "", limit: int = 7, between_pages=lambda: None) -> list[str]:
    keys: list[str] = []
    position: ScanPosition | None = ScanPosition(1, 0, None)
    while position is not None:
        items, position = store.scan(prefix, position, limit, 1 << 30, with_values=False)
        keys.extend(i.key for i in items)
        between_pages()
    return keys


# -- model-based property test ---------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "key:1", "key:2", "é", "日本"])
VALUES = st.binary(max_size=8)
TTLS = st.sampled_from([0, 0, 1, 5, 50])


class StoreMachine(RuleBasedStateMachine):
    """The store behaves like a dict of (value, revision, deadline), where a
    key past its deadline is absent; revisions grow by one per change and the
    sink sees every change in revision order."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = Store(clock=self.clock)
        self.sink = Recorder()
        self.store.attach_sink(self.sink)
        self.model: dict[str, tuple[bytes, int, int]] = {}  # may hold expired keys
        self.last_revision = 0

    def live(self, key: str) -> tuple[bytes, int, int] | None:
        entry = self.model.get(key)
        if entry is None or (entry[2] and entry[2] <= self.clock.now):
            return None
        return entry

    def check_new_records(self, before: int, model_before: dict[str, tuple[bytes, int, int]]) -> None:
        for record in self.sink.records[before:]:
            if record.op is Op.EXPIRE:
                entry = model_before.get(record.key)
                assert entry is not None and entry[2] and entry[2] <= self.clock.now
                self.model.pop(record.key, None)

    @rule(key=KEYS, value=VALUES, ttl=TTLS, condition=st.sampled_from(["none", "absent", "current", "wrong"]))
    def set(self, key: str, value: bytes, ttl: int, condition: str) -> None:
        current = self.live(key)
        current_rev = current[1] if current else 0
        expect = {"none": None, "absent": 0, "current": current_rev, "wrong": current_rev + 1000}[condition]
        before, model_before = len(self.sink.records), dict(self.model)
        outcome = self.store.set(key, value, ttl, expect)
        self.check_new_records(before, model_before)
        should_apply = expect is None or expect == current_rev
        assert outcome.applied == should_apply
        assert outcome.existed == (current is not None)
        if should_apply:
            assert outcome.revision > self.last_revision
            self.last_revision = outcome.revision
            self.model[key] = (value, outcome.revision, self.clock.now + ttl if ttl else 0)
            last = self.sink.records[-1]
            assert (last.op, last.key, last.value, last.revision) == (Op.SET, key, value, outcome.revision)
        else:
            assert outcome.revision == current_rev

    @rule(key=KEYS, conditional=st.booleans())
    def delete(self, key: str, conditional: bool) -> None:
        current = self.live(key)
        expect = (current[1] if current else 1) if conditional else None
        before, model_before = len(self.sink.records), dict(self.model)
        outcome = self.store.delete(key, expect)
        self.check_new_records(before, model_before)
        assert outcome.existed == (current is not None)
        assert outcome.applied == (current is not None or not conditional)
        if current is not None:
            assert outcome.revision > self.last_revision
            self.last_revision = outcome.revision
            del self.model[key]

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        before, model_before = len(self.sink.records), dict(self.model)
        item = self.store.get(key)
        self.check_new_records(before, model_before)
        expected = self.live(key)
        if expected is None:
            assert item is None
        else:
            assert item is not None
            assert (item.value, item.mod_revision) == expected[:2]
            assert item.ttl_ms == (expected[2] - self.clock.now if expected[2] else 0)

    @rule(ms=st.integers(0, 20))
    def advance_clock(self, ms: int) -> None:
        self.clock.now += ms

    @rule(budget=st.integers(1, 4))
    def expire_step(self, budget: int) -> None:
        before, model_before = len(self.sink.records), dict(self.model)
        examined = self.store.expire_step(budget)
        assert examined <= budget
        self.check_new_records(before, model_before)

    @rule()
    def scan(self) -> None:
        before, model_before = len(self.sink.records), dict(self.model)
        keys = full_scan(self.store, limit=2)
        self.check_new_records(before, model_before)
        assert sorted(keys) == sorted(k for k in self.model if self.live(k))

    @invariant()
    def revisions_are_dense_and_ordered(self) -> None:
        revisions = [r.revision for r in self.sink.records]
        assert revisions == list(range(1, len(revisions) + 1))
        assert self.store.revision == len(revisions)

    @invariant()
    def bookkeeping_is_exact(self) -> None:
        for shard in self.store._shards:
            entries = shard.entries()
            live_ttls = sum(1 for _, e in entries if e.expires_at_ms)
            assert len(shard.deadlines) == shard.stale + live_ttls
            assert shard.nbytes == sum(len(k.encode()) + len(e.value) for k, e in entries)
            assert shard.expiries.keys() <= shard.data.keys()
        # The model keeps expired keys the store has not reaped yet.
        stored = {k for s in self.store._shards for k in s.data}
        assert stored <= set(self.model)
        assert {k for k in self.model if self.live(k)} <= stored


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = hsettings(max_examples=120, stateful_step_count=50, deadline=None)


# -- sharding ----------------------------------------------------------------


def test_shard_is_crc32_of_utf8_key_mod_256() -> None:
    # Fixed values: the shard of a key must never change across versions.
    assert shard_of("hello") == zlib.crc32(b"hello") % 256 == 134
    assert shard_of("日本") == zlib.crc32("日本".encode()) % 256


def test_sequential_keys_spread_evenly_over_shards() -> None:
    counts = Counter(shard_of(f"user:{i}") for i in range(256_000))
    assert len(counts) == NUM_SHARDS
    assert min(counts.values()) > 700 and max(counts.values()) < 1300  # 1000 expected


# -- order under threads -----------------------------------------------------


def test_sinks_see_changes_in_revision_order_under_concurrent_writers() -> None:
    store = Store()
    sink = Recorder()
    store.attach_sink(sink)
    writes_per_thread = 5000

    def writer(n: int) -> None:
        rng = random.Random(n)
        for i in range(writes_per_thread):
            key = f"k{rng.randrange(500)}"
            if rng.random() < 0.2:
                store.delete(key)
            else:
                store.set(key, f"{n}:{i}".encode())

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    revisions = [r.revision for r in sink.records]
    assert revisions == list(range(1, store.revision + 1))
    # Replaying the records in order rebuilds exactly the store's state.
    replayed: dict[str, tuple[bytes, int]] = {}
    for r in sink.records:
        if r.op is Op.SET:
            assert r.value is not None
            replayed[r.key] = (r.value, r.revision)
        else:
            replayed.pop(r.key)
    actual = {}
    for key in full_scan(store, limit=1000):
        item = store.get(key)
        assert item is not None
        actual[key] = (item.value, item.mod_revision)
    assert actual == replayed


def test_detached_sink_receives_nothing_more() -> None:
    store = Store()
    sink = Recorder()
    store.attach_sink(sink)
    store.set("a", b"1")
    store.detach_sink(sink)
    store.set("a", b"2")
    assert [r.revision for r in sink.records] == [1]
    assert store.revision == 2


# -- TTL ------------------------------------------------------------------


def test_get_expires_a_key_past_its_deadline_and_records_it() -> None:
    clock = FakeClock()
    store = Store(clock=clock)
    sink = Recorder()
    store.attach_sink(sink)
    store.set("k", b"v", ttl_ms=100)
    item = store.get("k")
    assert item is not None and item.ttl_ms == 100
    clock.now += 99
    assert store.get("k") is not None
    clock.now += 1
    assert store.get("k") is None
    assert [(r.op, r.key, r.revision) for r in sink.records] == [(Op.SET, "k", 1), (Op.EXPIRE, "k", 2)]
    assert len(store) == 0 and store.data_bytes == 0 and store.expired_keys == 1


def test_set_without_ttl_clears_an_earlier_ttl() -> None:
    clock = FakeClock()
    store = Store(clock=clock)
    store.set("k", b"v", ttl_ms=10)
    store.set("k", b"w")
    clock.now += 1000
    assert store.get("k") is not None
    assert store.expire_step(100) == 1  # the stale deadline, skipped
    assert store.get("k") is not None


def test_expire_step_does_bounded_work_and_resumes() -> None:
    clock = FakeClock()
    store = Store(clock=clock)
    sink = Recorder()
    store.attach_sink(sink)
    for i in range(1000):
        store.set(f"k{i}", b"v", ttl_ms=1 + i % 7)
    store.set("forever", b"v")
    clock.now += 10
    steps = []
    while True:
        examined = store.expire_step(64)
        steps.append(examined)
        if examined < 64:
            break
    assert all(n <= 64 for n in steps)
    assert sum(steps) == 1000
    assert len(store) == 1 and store.expired_keys == 1000
    assert sorted(r.key for r in sink.records if r.op is Op.EXPIRE) == sorted(f"k{i}" for i in range(1000))


def test_expire_step_leaves_keys_not_yet_due() -> None:
    clock = FakeClock()
    store = Store(clock=clock)
    store.set("soon", b"v", ttl_ms=10)
    store.set("later", b"v", ttl_ms=1000)
    clock.now += 10
    assert store.expire_step(100) == 1
    assert store.get("soon") is None and store.get("later") is not None


def test_heap_compaction_frees_stale_deadlines() -> None:
    store = Store(clock=FakeClock())
    key = next(f"k{i}" for i in range(10_000) if shard_of(f"k{i}") == 0)
    for _ in range(3000):
        store.set(key, b"v", ttl_ms=60_000)
    shard = store._shards[0]
    assert len(shard.deadlines) == 3000
    store.expire_step(10)
    assert len(shard.deadlines) == 1 and shard.stale == 0


# -- conditional writes ------------------------------------------------------


def test_conditional_writes_from_many_threads_exactly_one_wins_per_revision() -> None:
    store = Store()
    store.set("counter", b"0")
    winners: list[int] = []
    lock = threading.Lock()

    def incrementer() -> None:
        for _ in range(300):
            while True:
                item = store.get("counter")
                assert item is not None
                outcome = store.set("counter", str(int(item.value) + 1).encode(), expect_revision=item.mod_revision)
                if outcome.applied:
                    with lock:
                        winners.append(outcome.revision)
                    break

    threads = [threading.Thread(target=incrementer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    item = store.get("counter")
    assert item is not None and int(item.value) == 1200
    assert len(set(winners)) == 1200


# -- scan -------------------------------------------------------------------


def test_scan_lists_prefix_matches_in_shard_then_key_order() -> None:
    store = Store()
    for i in range(300):
        store.set(f"user:{i}", b"x")
        store.set(f"order:{i}", b"y")
    keys = full_scan(store, prefix="user:", limit=13)
    assert len(keys) == len(set(keys)) == 300
    assert keys == sorted(keys, key=lambda k: (shard_of(k), k))
    assert full_scan(store, prefix="nope") == []


def test_scan_returns_keys_present_throughout_exactly_once_under_writes() -> None:
    store = Store()
    stable = {f"stable:{i}" for i in range(2000)}
    for key in stable:
        store.set(key, b"v")
    rng = random.Random(7)
    churn = [f"churn:{i}" for i in range(500)]

    def mutate() -> None:
        for _ in range(50):
            key = rng.choice(churn)
            if rng.random() < 0.5:
                store.set(key, b"new")
            else:
                store.delete(key)
        store.set(rng.choice(sorted(stable)), b"rewritten")  # rewrites keep the key

    keys = full_scan(store, limit=17, between_pages=mutate)
    counts = Counter(keys)
    assert all(counts[k] == 1 for k in stable)
    assert max(counts.values()) == 1


def test_scan_survives_evicted_snapshots() -> None:
    store = Store()
    for i in range(3000):
        store.set(f"k{i}", b"v")
    keys = full_scan(store, limit=5, between_pages=store._snapshots.clear)
    assert sorted(keys) == sorted(f"k{i}" for i in range(3000))


def test_scan_page_stops_at_byte_budget() -> None:
    store = Store()
    for i in range(10):
        store.set(f"k{i}", b"x" * 1000)
    items, position = store.scan("", ScanPosition(1, 0, None), 100, 2500, with_values=True)
    assert len(items) == 3 and position is not None


def test_scan_call_does_bounded_work_on_a_large_store() -> None:
    store = Store()
    for i in range(SCAN_WORK_BUDGET * 2):
        store.set(f"k{i}", b"")
    items, position = store.scan("nomatch", ScanPosition(1, 0, None), 10, 1 << 30, with_values=False)
    assert items == [] and position is not None
    assert 0 < position.shard < NUM_SHARDS


@pytest.mark.parametrize("value", [b"", b"\x00\xff" * 10])
def test_values_are_bytes_as_given(value: bytes) -> None:
    store = Store()
    store.set("k", value)
    item = store.get("k")
    assert item is not None and item.value == value

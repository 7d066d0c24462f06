"""Single-event kernel: online._window_group on _EntityState vs online_pool.window_group on a Pool, fraud plans,
same warmed states (79k history events), 5,000 live events: features only, then inserts."""
import os, sys, time
import numpy as np
os.environ["REPS"] = "0"
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "poolbench.py")).read().split('print("load"')[0])
from keel.features.online import _window_group, _number
from keel.features.online_pool import window_group
store = OnlineStore.from_spec(spec, f"{work}/single.sqlite")
for i in range(0, len(s.history), 1000):
    store.features_columns(cols(s.history[i:i + 1000])); store.commit_staged()
f = PoolFeatures()
for i in range(0, len(s.history), 1000):
    f.batch(pcols(s.history[i:i + 1000]))
pools = {"customer_id": f.pc, "terminal_id": f.pt}
live = s.live[:5000]
evs = [(store._event_time(e), e) for e in live]
plans = store._plans
def run_state():
    out = {}
    for t, e in evs:
        scaled = {}
        for entity in store._entities:
            st_ = store._state(entity, str(e[entity]))
            cur = {c: _number(e.get(c)) for c in store._columns[entity]}
            for p in plans[entity]:
                _window_group(st_, p, t, cur, None, out, scaled)
    return out
def run_pool():
    out = {}
    for t, e in evs:
        scaled = {}
        for entity in store._entities:
            pool = pools[entity]
            slot = pool.slot(str(e[entity]))
            cur = {c: _number(e.get(c)) for c in store._columns[entity]}
            for p in plans[entity]:
                window_group(pool, slot, p, t, cur, None, out, scaled)
    return out
def check():
    bad = 0
    for t, e in evs[:2000]:
        a, b = {}, {}
        for entity in store._entities:
            cur = {c: _number(e.get(c)) for c in store._columns[entity]}
            for p in plans[entity]:
                _window_group(store._state(entity, str(e[entity])), p, t, cur, None, a, {})
                window_group(pools[entity], pools[entity].slot(str(e[entity])), p, t, cur, None, b, {})
        bad += repr(sorted(a.items())) != repr(sorted(b.items()))
    return bad
print("events differing (of 2000):", check())
A, B = [], []
for r in range(5):
    c0 = time.thread_time(); run_state(); c1 = time.thread_time(); run_pool(); c2 = time.thread_time()
    A.append((c1 - c0) / len(evs) * 1e6); B.append((c2 - c1) / len(evs) * 1e6)
print(f"windows, 2 entities x 3 window groups per event: state {np.median(A):.1f} us/event, pool {np.median(B):.1f} (thread CPU, medians of 5 alternating; load {os.getloadavg()})")
# inserts (in time order, appends): _EntityState.insert vs Pool.insert
st_ = [store._state("customer_id", str(e["customer_id"])) for _, e in evs]
ps = [f.pc.slot(str(e["customer_id"])) for _, e in evs]
c0 = time.thread_time()
for (t, e), x in zip(evs, st_):
    x.insert(t, str(e["transaction_id"]), {"tx_amount": e["tx_amount"]}, 0)
c1 = time.thread_time()
for (t, e), x in zip(evs, ps):
    f.pc.insert(x, t, {"tx_amount": e["tx_amount"]}, 0, str(e["transaction_id"]))
c2 = time.thread_time()
print(f"insert one event (customer, 1 value column, prefix kept): state {(c1-c0)/len(evs)*1e6:.1f} us, pool {(c2-c1)/len(evs)*1e6:.1f} us")

"""Pool (keel.features.online_pool) on the serving bench's data, fraud spec shape, against the real OnlineStore.

Batch: 79k history events then 60 batches of 1,000 live events; per batch slots + appendable check + append +
window edges + exact sums + prune (+ compaction when half the pool is dead). Checks all 12 window features
bit-identical to OnlineStore.features_columns on every live event. Times A (store) and B (pool) alternating,
thread CPU. Single: per event, the pool's scalar path (slot, region_bisect, sum_one, insert, prune) against
store.features(e) + store.stage(e)."""
import math, os, pickle, sys, time
import numpy as np
sys.path.insert(0, '/work/main/bench')
from keel.spec import load_spec
from keel.features.online import OnlineStore
from keel.features.online_pool import Pool, window_columns, window_group

DAY = 86400 * 10**9
s = pickle.load(open(os.environ.get("SETUP", "/tmp/s4/w/setup.pkl"), "rb"))  # bench_serve.prepare()'s result
spec = load_spec(s.spec_path)
work = os.environ.get("WORK", f"/tmp/columnar-bench/w{os.getpid()}"); os.makedirs(work)
REPS = int(os.environ.get("REPS", 3))
_plans_store = OnlineStore.from_spec(spec, f"{work}/plans.sqlite")
PLANS = _plans_store._plans
_plans_store.close()


def cols(evs):
    return {"transaction_id": [e["transaction_id"] for e in evs],
            "tx_datetime": np.array([e["tx_datetime"] for e in evs], dtype="datetime64[ns]"),
            "customer_id": [e["customer_id"] for e in evs], "terminal_id": [e["terminal_id"] for e in evs],
            "tx_amount": np.array([e["tx_amount"] for e in evs], np.float64)}


def pcols(evs):
    return {"t": np.array([e["tx_datetime"] for e in evs], dtype="datetime64[ns]").view(np.int64),
            "ids": [e["transaction_id"] for e in evs],
            "customer": [e["customer_id"] for e in evs], "terminal": [e["terminal_id"] for e in evs],
            "amount": np.array([e["tx_amount"] for e in evs], np.float64)}


class PoolFeatures:
    def __init__(self):
        self.pc, self.pt = Pool(["tx_amount"], rows=1 << 16, slots=1 << 12), Pool([], rows=1 << 16, slots=1 << 12)
        self.seq = 1
        self.missed = 0

    def batch(self, b):
        pc, pt = self.pc, self.pt
        n = len(b["t"])
        t = b["t"]
        ids = list(map(str, b["ids"]))  # (keys as text, as the store's column path does, inside the timing)
        uc = pc.slots(list(map(str, b["customer"]))); ut = pt.slots(list(map(str, b["terminal"])))
        assert pc.appendable(uc, t) and pt.appendable(ut, t)
        seq = np.arange(self.seq, self.seq + n); self.seq += n
        posc = pc.append(uc, t, {"tx_amount": b["amount"]}, seq, ids)
        post = pt.append(ut, t, {}, seq, ids)
        out = {}
        missed = 0
        for pool, u, pos, plans in ((pc, uc, posc, PLANS["customer_id"]), (pt, ut, post, PLANS["terminal_id"])):
            for plan in plans:
                m = window_columns(pool, plan, u, t, pos, out)
                for j in np.flatnonzero(m).tolist():  # (none on this data)
                    row = {}
                    window_group(pool, int(u[j]), plan, int(t[j]), None, int(pos[j]), row)
                    for k, v in row.items():
                        out[k][j] = v
                missed += int(m.sum())
        self.missed += missed
        out = np.column_stack([out[nm] for nm in ORDER])
        for pool, u, h in ((pc, uc, 30 * DAY), (pt, ut, 37 * DAY)):
            us = np.unique(u)
            pool.prune(us, pool.t[pool.end[us] - 1] - h)
            if pool.wasted() > 0.5:
                pool.compact()
        return out


ORDER = ["customer_id_nb_tx_1day_window", "customer_id_avg_amount_1day_window", "customer_id_nb_tx_7day_window",
         "customer_id_avg_amount_7day_window", "customer_id_nb_tx_30day_window", "customer_id_avg_amount_30day_window",
         "terminal_id_nb_tx_1day_window", "terminal_id_risk_1day_window", "terminal_id_nb_tx_7day_window",
         "terminal_id_risk_7day_window", "terminal_id_nb_tx_30day_window", "terminal_id_risk_30day_window"]


def run_store(k):
    store = OnlineStore.from_spec(spec, f"{work}/st{k}.sqlite")
    for i in range(0, len(s.history), 1000):
        store.features_columns(cols(s.history[i:i + 1000])); store.commit_staged()
    batches = [cols(s.live[i:i + 1000]) for i in range(0, 60000, 1000)]
    res = []
    commit = 0.0
    c0, w0 = time.thread_time(), time.perf_counter()
    for b in batches:
        res.append(store.features_columns(b).matrix)
        k0 = time.thread_time()
        store.commit_staged()
        commit += time.thread_time() - k0
    c1, w1 = time.thread_time(), time.perf_counter()
    c1 -= commit
    print(f"  (store commit_staged on this thread: {1e6 * commit / 60000:.1f} us/event, not counted)")
    names = store.feature_names
    store.close()
    m = np.vstack(res)
    return 1e6 * (c1 - c0) / 60000, 1e6 * (w1 - w0) / 60000, m[:, [names.index(nm) for nm in ORDER]]


def run_pool():
    f = PoolFeatures()
    for i in range(0, len(s.history), 1000):
        f.batch(pcols(s.history[i:i + 1000]))
    batches = [pcols(s.live[i:i + 1000]) for i in range(0, 60000, 1000)]
    res = []
    c0, w0 = time.thread_time(), time.perf_counter()
    for b in batches:
        res.append(f.batch(b))
    c1, w1 = time.thread_time(), time.perf_counter()
    return 1e6 * (c1 - c0) / 60000, 1e6 * (w1 - w0) / 60000, np.vstack(res), f


print("load", os.getloadavg())
A, B = [], []
for r in range(REPS):
    ca, wa, ma = run_store(r)
    cb, wb, mb, f = run_pool()
    A.append(ca); B.append(cb)
    same = [np.array_equal(ma[:, j], mb[:, j], equal_nan=True) for j in range(12)]
    print(f"rep {r}: store features_columns {ca:.1f} us/event CPU ({wa:.1f} wall); "
          f"pool batch {cb:.1f} CPU ({wb:.1f} wall); bit-identical {sum(same)}/12 features on 60000 events")
print(f"median: store {np.median(A):.1f}, pool {np.median(B):.1f} us/event thread CPU; load {os.getloadavg()}")
print(f"events not covered by window_columns (per-event window_group): {f.missed}")
print(f"pool rows used {f.pc.used} live {f.pc.live} slots {len(f.pc.keys)} / {f.pt.used} {f.pt.live} {len(f.pt.keys)}")

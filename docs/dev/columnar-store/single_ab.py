"""The single-event store path, A/B in ONE process: main's online.py (loaded from MAIN, default
/work/main/src/keel/features/online.py, under another module name) against the OnlineStore on PYTHONPATH, both
preloaded from copies of one warmed store file (the serving bench's history, SETUP = bench_serve prepare() pickle);
then chunks of CH live events, alternating A and B, per event what the service calls for one event
(MODE=columns: features_columns of a one-event column batch; MODE=many: features_many([e], stage=True)), a commit
after each chunk (not timed). Thread CPU per event, median and min over the chunks, and whether every feature row
is bit-identical between the two."""
import importlib.util, os, pickle, shutil, sys, time
import numpy as np
import keel  # noqa: F401  (the keel on PYTHONPATH first: bench_serve puts /work/main/src at the front)
from keel.spec import load_spec
from keel.features.online import OnlineStore

sys.path.append("/work/main/bench")
s = pickle.load(open(os.environ.get("SETUP", "/tmp/s4/w/setup.pkl"), "rb"))
spec = load_spec(s.spec_path)
found = importlib.util.spec_from_file_location("keel_main_online", os.environ.get(
    "MAIN", "/work/main/src/keel/features/online.py"))
main_online = importlib.util.module_from_spec(found)
sys.modules["keel_main_online"] = main_online
found.loader.exec_module(main_online)
work = os.environ.get("WORK", f"/tmp/columnar-bench/ab{os.getpid()}"); os.makedirs(work)


def cols(evs):
    return {"transaction_id": [e["transaction_id"] for e in evs],
            "tx_datetime": np.array([e["tx_datetime"] for e in evs], dtype="datetime64[ns]"),
            "customer_id": [e["customer_id"] for e in evs], "terminal_id": [e["terminal_id"] for e in evs],
            "tx_amount": np.array([e["tx_amount"] for e in evs], np.float64)}


warm = OnlineStore.from_spec(spec, f"{work}/warm.sqlite")
for i in range(0, len(s.history), 1000):
    warm.features_columns(cols(s.history[i:i + 1000])); warm.commit_staged()
warm.close()
for name in ("a", "b"):
    shutil.copy(f"{work}/warm.sqlite", f"{work}/{name}.sqlite")
A = main_online.OnlineStore.from_spec(spec, f"{work}/a.sqlite"); A.preload()
B = OnlineStore.from_spec(spec, f"{work}/b.sqlite"); B.preload()
CH, REPS, MODE = int(os.environ.get("CH", 50)), int(os.environ.get("REPS", 100)), os.environ.get("MODE", "columns")
T = {"main": [], "branch": []}
out = {"main": [], "branch": []}
for r in range(REPS):
    chunk = s.live[r * CH:(r + 1) * CH]
    batches = [cols([e]) for e in chunk] if MODE == "columns" else [[e] for e in chunk]
    for name, store in (("main", A), ("branch", B)) if r % 2 == 0 else (("branch", B), ("main", A)):
        call = store.features_columns if MODE == "columns" else (lambda b, st=store: st.features_many(b, stage=True))
        c0 = time.thread_time()
        for b in batches:
            out[name].append(call(b).matrix)
        T[name].append(1e6 * (time.thread_time() - c0) / CH)
        store.commit_staged()
same = np.vstack(out["main"]).tobytes() == np.vstack(out["branch"]).tobytes()
for name in T:
    print(f"{name}: {MODE} one event: median {np.median(T[name]):.1f} min {min(T[name]):.1f} us/event thread CPU")
print(f"bit-identical: {same} ({CH * REPS} events); load {os.getloadavg()}")
A.close(); B.close(); shutil.rmtree(work)

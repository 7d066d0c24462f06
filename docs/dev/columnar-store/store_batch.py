"""features_columns (stage=True) thread CPU per event on the serving bench data: 79k history, then 60 batches of
1,000 live events; commit_staged timed apart. OUT=<npy> saves the live feature matrix."""
import os, sys, pickle, time, shutil
import numpy as np
import keel
from keel.spec import load_spec
from keel.features.online import OnlineStore
sys.path.append("/work/main/bench")
s = pickle.load(open(os.environ.get("SETUP", "/tmp/s4/w/setup.pkl"), "rb"))
spec = load_spec(s.spec_path)
work = os.environ.get("WORK", f"/tmp/columnar-bench/sb{os.getpid()}"); os.makedirs(work)
def cols(evs):
    return {"transaction_id": [e["transaction_id"] for e in evs],
            "tx_datetime": np.array([e["tx_datetime"] for e in evs], dtype="datetime64[ns]"),
            "customer_id": [e["customer_id"] for e in evs], "terminal_id": [e["terminal_id"] for e in evs],
            "tx_amount": np.array([e["tx_amount"] for e in evs], np.float64)}
store = OnlineStore.from_spec(spec, f"{work}/s.sqlite")
for i in range(0, len(s.history), 1000):
    store.features_columns(cols(s.history[i:i + 1000])); store.commit_staged()
batches = [cols(s.live[i:i + 1000]) for i in range(0, 60000, 1000)]
res = []; f = c = 0.0
for b in batches:
    c0 = time.thread_time(); res.append(store.features_columns(b).matrix); c1 = time.thread_time()
    store.commit_staged(); c2 = time.thread_time()
    f += c1 - c0; c += c2 - c1
store.close(); shutil.rmtree(work)
print(f"{os.path.dirname(keel.__file__)}: features_columns {1e6 * f / 60000:.1f} us/event, commit_staged {1e6 * c / 60000:.1f} us/event (thread CPU; load {os.getloadavg()[0]:.1f})")
if os.environ.get("OUT"):
    np.save(os.environ["OUT"], np.vstack(res))

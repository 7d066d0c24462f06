"""Bit-identity on the serving bench data: features_columns in batches of 1,000 (the batch path) against the
event-by-event replay (features_many of 31 events: below the batch path's minimum), history and live."""
import os, sys, pickle, shutil
import numpy as np
import keel
from keel.spec import load_spec
from keel.features.online import OnlineStore
sys.path.append("/work/main/bench")
s = pickle.load(open(os.environ.get("SETUP", "/tmp/s4/w/setup.pkl"), "rb"))
spec = load_spec(s.spec_path)
work = os.environ.get("WORK", f"/tmp/columnar-bench/rc{os.getpid()}"); os.makedirs(work)
def cols(evs):
    return {"transaction_id": [e["transaction_id"] for e in evs],
            "tx_datetime": np.array([e["tx_datetime"] for e in evs], dtype="datetime64[ns]"),
            "customer_id": [e["customer_id"] for e in evs], "terminal_id": [e["terminal_id"] for e in evs],
            "tx_amount": np.array([e["tx_amount"] for e in evs], np.float64)}
events = list(s.history) + list(s.live)
a = OnlineStore.from_spec(spec, f"{work}/a.sqlite"); b = OnlineStore.from_spec(spec, f"{work}/b.sqlite")
ma = [];  mb = []
for i in range(0, len(events), 1000):
    ma.append(a.features_columns(cols(events[i:i + 1000])).matrix); a.commit_staged()
for i in range(0, len(events), 31):
    mb.append(b.features_many(events[i:i + 31], stage=True).matrix)
    if i % 1000 < 31: b.commit_staged()
A, B = np.vstack(ma), np.vstack(mb)
names = a.feature_names
diff = [n for j, n in enumerate(names) if A[:, j].tobytes() != B[:, j].tobytes()]
print(f"{os.path.dirname(keel.__file__)}: {A.shape[0]} events x {len(names)} features; batch path vs replay bit-identical: {not diff} {diff}")
a.close(); b.close(); shutil.rmtree(work)

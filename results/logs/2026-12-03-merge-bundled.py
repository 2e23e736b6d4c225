# Replaces the bundled tuned configs of kernels whose source changed (their entries are keyed by the old kernel
# hash and never found) with a new tune's export; argv: bundled file, exported file. Entries of unchanged kernels
# stay as they are; the stale ones are dropped, and the export's (current hashes) added.
import json, sys
from fastbench.autotune import key, store
from fastbench.autotune.tuner import discover
bundled, exported = sys.argv[1], sys.argv[2]
doc, new = json.load(open(bundled)), json.load(open(exported))
assert new["device"] == doc["device"] and new["toolchain"] == doc["toolchain"], (new["device"], new["toolchain"])
current = {ref.spec.name: key.kernel_hash(ref.spec) for ref in discover()}
stale = sorted(k for k, e in doc["entries"].items() if e["kernel"] != current.get(e["op"]))
for k in stale:
    del doc["entries"][k]
doc["entries"].update(new["entries"])
store.write_atomic(store.Path(bundled), doc)
ops = sorted({k.split("/")[0] for k in stale})
print(f"dropped {len(stale)} stale entries ({', '.join(ops)}), added {len(new['entries'])}; {len(doc['entries'])} now")

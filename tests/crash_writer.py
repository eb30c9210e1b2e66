"""A writer process for the crash tests: appends the deterministic trace stream forever.

Prints "committed N" after every commit returns, so the parent knows a lower
bound of what must survive a kill.
"""

import sys
import time

from conftest import make_record, writer_kwargs
from tribunal.store import StoreWriter

path, batch = sys.argv[1], int(sys.argv[2])
with StoreWriter(path, **writer_kwargs(layers=(2, 5, 9), d_model=64, dtype=sys.argv[3])) as writer:
    print(f"opened {writer.n_traces} repairs={len(writer.repairs)}", flush=True)
    while True:
        start = writer.n_traces
        writer.append([make_record(i, layers=(2, 5, 9), d_model=64) for i in range(start, start + batch)])
        print(f"committed {writer.n_traces}", flush=True)
        if len(sys.argv) > 4:
            time.sleep(float(sys.argv[4]))

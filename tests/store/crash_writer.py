"""A writer process for the crash tests: appends the deterministic trace stream forever.

Prints "opened N repairs=R" once the store is open and "committed N" after every commit returns, so the
parent knows when the writer is past its open and a lower bound of what must survive a kill.

    python crash_writer.py STORE BATCH DTYPE [PAUSE_SECONDS] [--monitored]

--monitored: a store with monitor scores and exit records (tests/store/monitored.py).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

from conftest import make_record, writer_kwargs  # noqa: E402
from store.monitored import FIELDS, monitored_record  # noqa: E402
from tribunal.store import StoreWriter  # noqa: E402

LAYERS, D_MODEL = (2, 5, 9), 64

monitored = "--monitored" in sys.argv
args = [a for a in sys.argv if a != "--monitored"]
path, batch = args[1], int(args[2])
extra = dict(monitor_fields=FIELDS, exit_table=True) if monitored else {}
record = monitored_record if monitored else make_record
with StoreWriter(path, **writer_kwargs(layers=LAYERS, d_model=D_MODEL, dtype=args[3], **extra)) as writer:
    print(f"opened {writer.n_traces} repairs={len(writer.repairs)}", flush=True)
    while True:
        start = writer.n_traces
        writer.append([record(i, layers=LAYERS, d_model=D_MODEL) for i in range(start, start + batch)])
        print(f"committed {writer.n_traces}", flush=True)
        if len(args) > 4:
            time.sleep(float(args[4]))

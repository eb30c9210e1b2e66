"""Helpers the benchmarks share."""

import os
import time
from pathlib import Path

import numpy as np

# Appended to a `python -c` program: prints that interpreter's own peak RSS (VmHWM, kB). ru_maxrss of
# a child would not do: Linux keeps the high-water mark across fork + exec, so it would include the
# benchmark's own memory.
PRINT_OWN_PEAK_RSS = "\nprint('MAXRSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def own_peak_rss_bytes(stdout: str) -> int:
    """The peak RSS that PRINT_OWN_PEAK_RSS printed."""
    return int([x for x in stdout.splitlines() if x.startswith("MAXRSS")][-1].split()[1]) * 1024


def export_layers_to_npy(store, layers, work: Path) -> list[Path]:
    """Each layer's stored words as a raw .npy file: the same bytes, for numpy memmap baselines."""
    paths = []
    for layer in layers:
        path = work / f"layer_{layer}.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(store.n_tokens, store.d_model))
        for _, first, block in store.iter_blocks(layer):
            mm[first : first + len(block)] = block
        mm.flush()
        del mm
        paths.append(path)
    return paths


def drop_cache(path) -> None:
    """Evict a file from the page cache (for cold-cache reads) without root: write back, then fadvise."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def machine_load() -> str:
    """The load averages beside the core count, printed with every figure: the machines are shared."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} cpus"


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call: on a shared machine the CPU
    seconds say what each method costs, the wall seconds what it gets of the machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def print_table(title, header, rows) -> None:
    """A markdown table (under a ### title, if any) on stdout, as docs/benchmarks.md records it."""
    if title:
        print(f"\n### {title}")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")

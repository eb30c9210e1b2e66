"""Helpers the benchmarks share."""

from pathlib import Path

import numpy as np


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

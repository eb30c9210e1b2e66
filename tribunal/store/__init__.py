"""The activation store: one HDF5 file per shard, format v1 (docs/store-format.md).

Never imports torch or transformers.
"""

from .format import SCHEMA_VERSION
from .reader import AGGREGATIONS, Store, Trace, open_store
from .writer import StoreWriter, TraceRecord

__all__ = ["SCHEMA_VERSION", "AGGREGATIONS", "Store", "Trace", "open_store", "StoreWriter", "TraceRecord"]

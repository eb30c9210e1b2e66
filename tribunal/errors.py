"""User-facing errors: one line that says what is wrong and what to do next.

The CLI turns a :class:`TribunalError` into a one-line message and exit status 1;
anything else is a bug and keeps its traceback.
"""


class TribunalError(Exception):
    """A problem the user can fix (bad input, wrong store, missing file)."""


class StoreError(TribunalError):
    """The store cannot be opened, read or written as asked."""


class StoreLockedError(StoreError):
    """Another live process is writing the store."""


class IncompatibleStoreError(StoreError):
    """The store was written with another model, layer set, d_model, dtype or schema."""


class DamagedStoreError(StoreError):
    """The file is a tribunal store but lacks something a reader needs (an attribute, a dataset)."""

    def __init__(self, path, problems: list[str]):
        self.path, self.problems = path, list(problems)
        more = f" (and {len(problems) - 1} more: `tribunal verify` lists them)" if len(problems) > 1 else ""
        super().__init__(f"{path} is damaged and cannot be read: {problems[0]}{more}; "
                         "restore the file from a copy or regenerate this shard")


class OverlappingStoresError(StoreError):
    """The same (problem, sample) is in two files read together: they would count it twice."""

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

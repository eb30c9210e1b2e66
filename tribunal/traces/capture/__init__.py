"""Capturing residual streams: hooks.py (forward hooks while the hf engine decodes, and the one conversion to the
store's words), teacher_forcing.py (one forward over finished traces) and recapture.py (`tribunal capture`)."""

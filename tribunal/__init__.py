"""tribunal: do a reasoning model's activations know whether its chain of thought is going right?

The data flows one way: problems -> traces -> store -> probes -> report, and the
sub-packages are named after those steps.
"""

__version__ = "0.1.0"

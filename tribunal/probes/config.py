"""The probes' options, defined once: defaults and help here; the click options of `probe trajectory|tokens|chunks`
and `run`, the keys of --config files and the arguments that `tribunal slurm submit` writes into its probe job
are all derived from this dataclass (as the generator's are from traces/settings.py's GenerateConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..config import parse_size
from ..errors import TribunalError
from ..store.reader import AGGREGATIONS, DEFAULT_BLOCK_BYTES

PROBES = ("trajectory", "tokens", "chunks")


def option(default, help: str, probes=PROBES, **cli):
    """A field with its command-line help and the probes that take it. cli: flags=(...) (the command-line
    spelling when it is not --the-name), given_stores=True (only for commands that probe stores given to them,
    not for run and slurm submit, which probe what they sampled)."""
    return field(default=default, metadata={"help": help, "probes": tuple(probes), **cli})


@dataclass
class ProbeConfig:
    folds: int = option(5, "Cross-validation folds, grouped by problem.", ("trajectory", "chunks"))
    seed: int = option(0, "Seed of the folds, the permutations and the token probe's held-out split.")
    permutations: int = option(50, "Grouped permutations of the labels, shared by all cells (0 = skip).",
                               ("trajectory", "chunks"))
    memory: str | int = option("1G", "Memory budget of a pass over the store, e.g. 512M (or bytes); sets the block size.")
    aggregations: tuple = option(AGGREGATIONS, "Trajectory aggregations of each layer's tokens, a comma list.",
                                 ("trajectory",))
    last_k: int = option(10, "k of the last_k aggregation.", ("trajectory",), flags=("-k", "--last-k"))
    C: float = option(1.0, "Inverse L2 strength of the logistic probes.", ("trajectory", "chunks"), flags=("-C",))
    margin: float = option(0.02, "Early exit: accuracy the exit rule may lose against the full traces.", ("chunks",))
    test_fraction: float = option(0.25, "Token probe: share of problems held out.", ("tokens",))
    allow_steered: bool = option(False, "Probe stores sampled under an intervention (`tribunal steer`'s arms), "
                                        "which are not the model's own behaviour.", given_stores=True)

    def __post_init__(self):
        if isinstance(self.aggregations, str):  # the command line's comma list
            self.aggregations = tuple(a.strip() for a in self.aggregations.split(",") if a.strip())
        self.aggregations = tuple(self.aggregations)

    @classmethod
    def cli_fields(cls, *probes: str):
        """The fields that are command-line options (and --config keys) of any of these probes (of all when
        none is named), in declaration order."""
        return [f for f in fields(cls) if not probes or set(probes) & set(f.metadata["probes"])]

    @staticmethod
    def flags(f) -> tuple:
        """A field's command-line spelling: --the-name unless it says otherwise."""
        return f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))

    @staticmethod
    def as_argument(value) -> str:
        """A value as the command line writes it (aggregations as a comma list)."""
        return ",".join(value) if isinstance(value, tuple) else str(value)

    def arguments(self, probe: str) -> list[str]:
        """`tribunal probe PROBE` arguments for this probe's options that differ from their defaults."""
        args = []
        for f in self.cli_fields(probe):
            value = getattr(self, f.name)
            if value != f.default:
                args += [self.flags(f)[-1], self.as_argument(value)]
        return args

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory)

    @property
    def block_bytes(self) -> int:
        """Bytes of activations read per block in a pass over the store: a quarter of the budget, at most
        the store's default block (larger blocks read no faster), at least 1 MiB."""
        return max(1 << 20, min(DEFAULT_BLOCK_BYTES, self.memory_bytes // 4))

    def check_store(self, store) -> None:
        """Refuse a store sampled under an intervention unless --allow-steered: a direction fit on steered traces
        describes the intervention as much as the model."""
        steered = store.interventions
        if steered and not self.allow_steered:
            path, how = steered[0]
            raise TribunalError(f"{path} was sampled under an intervention ({how.get('kind')} at layer "
                                f"{how.get('layer')}, {how.get('arm', '')}): its traces are not the model's own "
                                "behaviour; probe an unsteered store, or pass --allow-steered")

    def validate(self) -> "ProbeConfig":
        """Refuse bad values before any work or output (a run must not sample for an hour and then fail here)."""
        if self.folds < 2:
            raise TribunalError(f"--folds must be at least 2 (grouped cross-validation), got {self.folds}")
        if self.seed < 0:
            raise TribunalError(f"--seed must be 0 or more, got {self.seed}")
        if self.permutations < 0:
            raise TribunalError(f"--permutations must be 0 (skip) or more, got {self.permutations}")
        try:
            if self.memory_bytes <= 0:
                raise ValueError
        except ValueError:
            raise TribunalError(f"--memory {self.memory!r}: give a size above 0 such as 512M or 2G") from None
        unknown = [a for a in self.aggregations if a not in AGGREGATIONS]
        if unknown or not self.aggregations:
            raise TribunalError(f"--aggregations {self.as_argument(self.aggregations)!r}: choose one or more of "
                                f"{','.join(AGGREGATIONS)}")
        if self.last_k < 1:
            raise TribunalError(f"--last-k must be at least 1, got {self.last_k}")
        if not self.C > 0:
            raise TribunalError(f"-C must be above 0, got {self.C}")
        if not 0 <= self.margin < 1:
            raise TribunalError(f"--margin is an accuracy in [0, 1), got {self.margin}")
        if not 0 < self.test_fraction < 1:
            raise TribunalError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        return self


DEFAULTS = ProbeConfig()  # the library functions' defaults, so each is written once (above)

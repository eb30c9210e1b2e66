"""Synthetic traces with a planted ground truth, written through the real store writer (`tribunal synth`).

Every token row is isotropic noise plus known parts, so an analysis can be
checked against the truth:

* a "value direction" w: every generated token of a trace in a signal layer
  carries s * w, with s ~ N(+-delta/2, 1) by label. Nothing else varies along w,
  so the ideal linear probe on the mean over generated tokens is w and its
  AUROC is exactly Phi(delta / sqrt 2) = the requested --signal.
* a position direction v (all layers): row t carries (t / 64) * v, as real
  residual streams encode position; with --length-confound the label is tied
  to trace length, and a probe can read length off v. Only position varies along v.
* a trace component (isotropic, orthogonal to w and v), as real residual streams vary
  from trace to trace in every direction, not only along the value direction.
* a problem component u_p shared by all samples of problem p (--problem-leak),
  with labels mostly decided per problem: an ungrouped split memorizes u_p.

Each trace is drawn from its own seed (run seed, trace index), so an
interrupted run resumes to the same store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from statistics import NormalDist

import numpy as np
from tqdm import tqdm

from ..config import parse_index_list, parse_range
from ..errors import TribunalError
from ..store.format import DTYPES
from ..store.writer import StoreWriter, TraceRecord

SYNTH_MODEL_ID = "tribunal/synthetic"
POSITION_SCALE = 64.0


def option(default, help: str | None = None, **cli):
    """A field with its command-line help; help=None: a setting of the library only, not a `synth` option.
    cli: choices=(...)."""
    return field(default=default, metadata={"help": help, "cli": help is not None, **cli})


@dataclass
class SynthSettings:
    """The settings of a synthetic store, defined once: `tribunal synth`'s options are derived from these fields.
    Index lists and ranges may be given as the command line writes them ('4,8,12-16', '64-256')."""

    traces: int = option(200, "Number of traces.")
    problems: int = option(50, "Number of problems (samples per problem = traces / problems).")
    layers: tuple = option("4,8,12,16", "Layer indices, e.g. 4,8,12-16.")
    d_model: int = option(64, "Width of each stored activation row.")
    tokens_per_trace: tuple = option("64-256", "Range of trace lengths in tokens.")
    dtype: str = option("float16", "Storage dtype.", choices=tuple(DTYPES))
    seed: int = option(0, "Seed of the planted truth and of every trace.")
    direction_seed: int | None = option(None, "Seed of the planted directions (default: --seed): stores of one "
                                              "--direction-seed and different --seed share the value direction, "
                                              "with independent traces (transfer).")
    signal: float = option(0.8, "AUROC of the ideal linear probe on the mean (0.5 = none).")
    signal_layers: tuple | None = option(None, "Layers carrying the signal (default: the middle half).")
    length_confound: float = option(0.0, "0..1: how much trace length decides the label.")
    problem_leak: float = option(0.0, "0..1: how much the problem decides the label.")
    prompt_tokens: int = option(16)
    problem_scale: float = option(1.0)
    trace_scale: float = option(1.0)
    batch_tokens: int = option(8192)
    chunk_signal: float | None = option(None, "Write reasoning chunks with intermediate answers instead; the ideal "
                                              "chunk-end probe's AUROC.")
    chunks_per_trace: tuple = option((2, 6))
    chunk_position_confound: float = option(0.0, "0..1: how much a chunk's position decides whether its answer is right.")

    def __post_init__(self):
        try:
            for name in ("layers", "signal_layers"):
                if isinstance(getattr(self, name), str):
                    setattr(self, name, tuple(parse_index_list(getattr(self, name))) or None)
            if isinstance(self.tokens_per_trace, str):
                self.tokens_per_trace = parse_range(self.tokens_per_trace)
        except ValueError as exc:
            raise TribunalError(str(exc)) from None

    @classmethod
    def cli_fields(cls):
        """The fields that are `tribunal synth` options, in declaration order."""
        return [f for f in fields(cls) if f.metadata["cli"]]

    def validate(self) -> "SynthSettings":
        if self.traces < 1 or self.problems < 1 or self.traces % self.problems:
            raise TribunalError(f"--traces ({self.traces}) must be a positive multiple of --problems ({self.problems})")
        lo, hi = self.tokens_per_trace
        if not 1 <= lo <= hi:
            raise TribunalError(f"--tokens-per-trace {lo}-{hi} must be a range like 64-256 with 1 <= low <= high")
        if self.prompt_tokens >= lo:
            self.prompt_tokens = max(0, lo - 1)
        if not 0.5 <= self.signal < 1.0:
            raise TribunalError(f"--signal is an AUROC in [0.5, 1), got {self.signal}")
        for name in ("length_confound", "problem_leak"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TribunalError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.chunk_signal is not None and not 0.5 <= self.chunk_signal < 1.0:
            raise TribunalError(f"--chunk-signal is an AUROC in [0.5, 1), got {self.chunk_signal}")
        if not 0.0 <= self.chunk_position_confound <= 1.0:
            raise TribunalError(f"--chunk-position-confound must be in [0, 1], got {self.chunk_position_confound}")
        if self.d_model < 4:
            raise TribunalError(f"--d-model must be at least 4, got {self.d_model}")
        self.layers = tuple(int(x) for x in self.layers)
        if self.signal_layers is None:
            n = len(self.layers)
            self.signal_layers = tuple(self.layers[n // 4 : max(n // 4 + 1, (3 * n + 3) // 4)])
        self.signal_layers = tuple(int(x) for x in self.signal_layers)
        unknown = [x for x in self.signal_layers if x not in self.layers]
        if unknown:
            raise TribunalError(f"signal layers {unknown} are not among --layers {list(self.layers)}")
        return self

    @property
    def samples_per_problem(self) -> int:
        return self.traces // self.problems

    @property
    def delta(self) -> float:
        """Separation of the class means along w, in units of its spread."""
        return float(np.sqrt(2.0) * NormalDist().inv_cdf(self.signal))


def _orthonormal(rng, d: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T.astype(np.float32)


class SynthWorld:
    """The fixed truth of one synthetic run: directions, problem components and per-trace draws."""

    def __init__(self, settings: SynthSettings):
        self.s = settings
        rng = np.random.default_rng([settings.seed, 0])
        self.direction, self.position_direction = _orthonormal(rng, settings.d_model, 2)
        if settings.direction_seed is not None:  # another seed's directions, this seed's traces and problems
            self.direction, self.position_direction = _orthonormal(
                np.random.default_rng([settings.direction_seed, 0]), settings.d_model, 2)
        P, d = settings.problems, settings.d_model
        self.problem_label = rng.permutation(np.arange(P) % 2)
        comp = rng.standard_normal((P, d)).astype(np.float32) * settings.problem_scale
        comp -= np.outer(comp @ self.direction, self.direction)
        self.problem_component = comp

    def trace(self, index: int) -> TraceRecord:
        if self.s.chunk_signal is not None:
            return self.chunk_trace(index)
        s = self.s
        problem, sample = divmod(index, s.samples_per_problem)
        rng = np.random.default_rng([s.seed, 1, index])
        if rng.random() < s.problem_leak:
            y = int(self.problem_label[problem])
        else:
            y = int(rng.random() < 0.5)
        lo, hi = s.tokens_per_trace
        u = rng.random()
        frac = (1.0 - s.length_confound) * u + s.length_confound * (1 - y)
        n_tokens = int(round(lo + (hi - lo) * frac))
        prompt = s.prompt_tokens
        latent = (s.delta / 2.0) * (1 if y else -1) + rng.standard_normal()
        acts = rng.standard_normal((len(s.layers), n_tokens, s.d_model), dtype=np.float32)
        acts += rng.standard_normal((len(s.layers), 1, s.d_model), dtype=np.float32) * s.trace_scale
        for u in (self.direction, self.position_direction):
            acts -= (acts @ u)[..., None] * u
        acts += (np.arange(n_tokens, dtype=np.float32) / POSITION_SCALE)[None, :, None] * self.position_direction
        if s.problem_leak > 0:
            acts += self.problem_component[problem]
        for i, layer in enumerate(s.layers):
            if layer in s.signal_layers:
                acts[i, prompt:] += latent * self.direction
        n_gen = n_tokens - prompt
        answer = str(int(rng.integers(1, 500)))
        gold = answer if y else str(int(answer) + 1)
        return TraceRecord(
            problem_id=problem,
            sample_index=sample,
            token_ids=rng.integers(0, 1000, n_tokens),
            prompt_length=prompt,
            activations=acts,
            label="correct" if y else "incorrect",
            text=f"Synthetic trace {index} of problem {problem}. The answer is {answer}.\n#### {answer}",
            predicted=answer,
            gold=gold,
            finish_reason="stop",
            logprobs=-rng.exponential(0.5, n_gen),
            entropies=rng.exponential(1.0, n_gen),
            seed=int(s.seed),
        )


    def chunk_trace(self, index: int) -> TraceRecord:
        """A trace of reasoning chunks that each state an intermediate answer (text in the R1 style, one token per
        character: token id = code point). Each chunk's last token carries c * w in the signal layers, with
        c ~ N(+-delta_c/2, 1) by whether its answer is right, so the ideal probe on chunk ends has AUROC
        --chunk-signal. With --chunk-position-confound the answer is more often right late in the trace, and
        position is readable off v (as in every synth store): a position-only signal."""
        s = self.s
        problem, sample = divmod(index, s.samples_per_problem)
        rng = np.random.default_rng([s.seed, 2, index])
        gold = int(rng.integers(10, 500))
        k = int(rng.integers(s.chunks_per_trace[0], s.chunks_per_trace[1] + 1))
        labels, parts, answers = [], [], []
        for j in range(k):
            relative = (j + 1) / k
            p_right = 0.5 + s.chunk_position_confound * (relative - 0.5)
            right = bool(rng.random() < p_right)
            labels.append(right)
            answer = gold if right else gold + int(rng.integers(1, 9))
            answers.append(answer)
            parts.append(CHUNK_PHRASES[j % len(CHUNK_PHRASES)].format(a=answer))
        final = answers[-1]
        text = "".join(parts) + f"</think>\n\nThe answer is \\boxed{{{final}}}."
        labels.append(labels[-1])
        prompt_ids = [ord("?")] * s.prompt_tokens
        token_ids = prompt_ids + [ord(ch) for ch in text]
        n_tokens, prompt = len(token_ids), s.prompt_tokens
        acts = rng.standard_normal((len(s.layers), n_tokens, s.d_model), dtype=np.float32)
        acts += rng.standard_normal((len(s.layers), 1, s.d_model), dtype=np.float32) * s.trace_scale
        for u in (self.direction, self.position_direction):
            acts -= (acts @ u)[..., None] * u
        acts += (np.arange(n_tokens, dtype=np.float32) / POSITION_SCALE)[None, :, None] * self.position_direction
        delta = float(np.sqrt(2.0) * NormalDist().inv_cdf(s.chunk_signal))
        ends, pos = [], 0
        for part in parts + [text[len("".join(parts)):]]:
            ends.append(pos + len(part.rstrip()) - 1)
            pos += len(part)
        for end, right in zip(ends, labels):
            latent = (delta / 2.0) * (1 if right else -1) + rng.standard_normal()
            for i, layer in enumerate(s.layers):
                if layer in s.signal_layers:
                    acts[i, prompt + end] += latent * self.direction
        n_gen = n_tokens - prompt
        return TraceRecord(
            problem_id=problem, sample_index=sample, token_ids=np.array(token_ids), prompt_length=prompt,
            activations=acts, label="correct" if labels[-1] else "incorrect", text=text, predicted=str(final),
            gold=str(gold), finish_reason="stop", logprobs=-rng.exponential(0.5, n_gen),
            entropies=rng.exponential(1.0, n_gen), seed=int(s.seed))


CHUNK_PHRASES = ("So far the total is {a}.\n\n", "Wait, let me check: it comes to {a}.\n\n",
                 "Hmm, adding again gives {a}.\n\n", "Alternatively, counting the other way: {a}.\n\n",
                 "Let me verify once more: {a}.\n\n", "So it should be {a}.\n\n")


def write_synthetic_store(out, settings: SynthSettings, progress: bool = True) -> dict:
    """Write (or resume) a synthetic store; returns counts of what is in it now."""
    settings.validate()
    world = SynthWorld(settings)
    truth = {k: v for k, v in asdict(settings).items() if k != "batch_tokens"}
    if settings.direction_seed is None:  # stores written before direction_seed existed keep their identity
        del truth["direction_seed"]
    truth.update(delta=settings.delta, direction_dataset="synth/direction")
    writer = StoreWriter(
        out,
        model_id=SYNTH_MODEL_ID,
        layers=settings.layers,
        d_model=settings.d_model,
        dtype=settings.dtype,
        model_revision="synthetic-v1",
        generation_settings={"synthetic": True},
        dataset_id=f"synthetic/seed-{settings.seed}",  # a seed's problems are its own: other seeds share none
        dataset_split="synthetic",
        seed=settings.seed,
        resume_identity={"synth": json.dumps(truth, sort_keys=True)},
        description="Synthetic traces with a planted value direction (tribunal synth); truth in /synth and attr 'synth'.",
        extra_attrs={"synth": json.dumps(truth, sort_keys=True)},
        extra_datasets={
            "synth/direction": (world.direction, {"description": "planted unit value direction w (signal layers)",
                                                  "signal_layers": list(settings.signal_layers)}),
            "synth/position_direction": (world.position_direction,
                                         {"description": f"unit direction carrying token position / {POSITION_SCALE:g}"}),
        },
    )
    with writer:
        done = writer.done_keys()
        todo = [i for i in range(settings.traces) if divmod(i, settings.samples_per_problem) not in done]
        batch, batch_tokens = [], 0
        for index in tqdm(todo, desc="synth", unit="trace", disable=not progress):
            rec = world.trace(index)
            batch.append(rec)
            batch_tokens += rec.n_tokens
            if batch_tokens >= settings.batch_tokens:
                writer.append(batch)
                batch, batch_tokens = [], 0
        writer.append(batch)
        return {"traces": writer.n_traces, "tokens": writer.n_tokens, "resumed_from": settings.traces - len(todo)}

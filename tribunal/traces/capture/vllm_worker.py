"""`--capture inline`: the residual stream and the sampling scores taken inside vLLM's own forward, in vLLM's worker.

vLLM builds its worker from a qualified class name (`LLM(worker_cls=...)`), in this process or in the engine's
own processes (as on GPUs), so the capture lives in a worker subclass: CaptureCPUWorker or CaptureGPUWorker. It
asks the model for EAGLE-3's auxiliary hidden states at tribunal's layers, which vLLM's Llama/Qwen/Mistral
models compute inside their compiled (and CUDA-graphed) forward as `hidden_states + residual` after each chosen
decoder layer: exactly the output of the transformers block (vLLM carries the residual beside the hidden state
and adds them in the next layer's fused add-norm). Each step, the rows of the flattened batch are mapped to
(request, position) (`step_rows`), copied to the host in the store's words (from a GPU asynchronously: the rows
are filed at the next step, by when they have arrived) and kept per request in one growing array; the logits
row of each request gives the log-prob of the token sampled from it and that distribution's entropy at the
run's temperature, computed where the logits are (only two floats per request leave the device).

The driver (engines/vllm_inline.py) takes a finished request's states and scores with `collective_rpc("tribunal_take")`,
as plain lists and bytes, which cross vLLM's process boundary without its insecure serialization.

Depends on vLLM's V1 model runner (0.32): `input_batch.req_ids`, `num_computed_tokens_cpu`, `positions`,
`execute_model_state` and `use_aux_hidden_state_outputs`; `check_runner` refuses a runner that lacks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .hooks import host_copy

CONFIG_KEY = "tribunal_capture"  # the key of vLLM's additional_config that carries CaptureSettings' fields
RUNNER_ATTRIBUTES = ("input_batch", "positions", "execute_model_state", "use_aux_hidden_state_outputs")


@dataclass(frozen=True)
class CaptureSettings:
    """What the worker captures: tribunal's layer indices (decoder blocks, from 0) to store, the store's dtype,
    the run's sampling temperature (the log-probs' and entropies'), and layers captured for the monitor's
    read-outs only. Travels in vLLM's additional_config, which is part of its compile cache's key: the
    read-outs themselves (a run's probes) are set per run (`tribunal_readouts`), so new probes do not recompile."""

    layers: tuple
    store_dtype: str
    temperature: float
    monitor_layers: tuple = ()

    @property
    def captured_layers(self) -> list[int]:
        return sorted(set(self.layers) | set(self.monitor_layers))

    def as_config(self) -> dict:
        return {CONFIG_KEY: {"layers": list(self.layers), "store_dtype": self.store_dtype,
                             "temperature": self.temperature, "monitor_layers": list(self.monitor_layers)}}

    @classmethod
    def from_config(cls, additional_config) -> "CaptureSettings":
        raw = (additional_config or {})[CONFIG_KEY]
        return cls(tuple(int(x) for x in raw["layers"]), str(raw["store_dtype"]), float(raw["temperature"]),
                   tuple(int(x) for x in raw.get("monitor_layers", ())))


def step_rows(counts, starts) -> np.ndarray:
    """The position each row of a step's flattened batch holds: the runner lays out each request's scheduled
    tokens (`counts`, in its batch order) one after the other, from the tokens it had computed (`starts`)."""
    counts = np.asarray(counts, np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    first_row = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, np.int64)
    return np.asarray(starts, np.int64)[owner] + (np.arange(len(owner)) - first_row[owner])


class _Rows:
    """A request's captured rows by position, in one array that grows (doubling) as positions arrive: a
    position written again (vLLM preempted and recomputed the request) keeps its last computation, the state
    the later tokens attended to. Holds the request's rows and no one else's."""

    def __init__(self):
        self.words = None
        self.filled = np.zeros(0, bool)

    def put(self, first: int, words: np.ndarray) -> None:
        """Rows for positions first, first + 1, ... (a request's tokens of one step are consecutive)."""
        end = first + len(words)
        if self.words is None:
            self.words = np.empty((max(end, 16), *words.shape[1:]), words.dtype)
            self.filled = np.zeros(len(self.words), bool)
        elif end > len(self.words):
            grown = np.empty((max(end, 2 * len(self.words)), *self.words.shape[1:]), self.words.dtype)
            grown[: len(self.words)] = self.words
            self.words = grown
            self.filled = np.concatenate([self.filled, np.zeros(len(grown) - len(self.filled), bool)])
        self.words[first:end] = words
        self.filled[first:end] = True

    def positions_and_words(self, layers: int) -> tuple[np.ndarray, np.ndarray]:
        if self.words is None:
            return np.zeros(0, np.int64), np.zeros((0, layers, 0), np.float32)
        positions = np.flatnonzero(self.filled)
        n = len(positions)
        words = self.words[:n] if n and positions[-1] == n - 1 else self.words[positions]
        return positions, np.ascontiguousarray(words)


@dataclass
class _Request:
    """What one request has been given so far: its rows (_Rows); per sampled token (by its position) the
    token, its log-prob and its distribution's entropy; the read-outs of its rows and the scores not yet
    drained; prompt positions to score (a continuation's forced tokens: position -> token)."""

    rows: _Rows = field(default_factory=_Rows)
    scores: dict = field(default_factory=dict)
    fresh_rows: list = field(default_factory=list)
    fresh_scores: dict = field(default_factory=dict)
    score_tokens: dict = field(default_factory=dict)


class CaptureSink:
    """The per-request store of captured rows in a worker; `take` hands a request's rows over and forgets them,
    `drain` hands over what the monitor reads each step."""

    def __init__(self, settings: CaptureSettings):
        self.settings = settings
        captured = settings.captured_layers
        self.stored = [captured.index(layer) for layer in sorted(settings.layers)]  # into the captured layers
        self._readouts = []
        self.requests: dict[str, _Request] = {}
        self._pending = None  # (order, sampled positions, scaled logits, their log-sum-exp, entropies) until sampled
        self._arriving = []  # steps' rows still on their way from the device: (ready, words, [(request, lo, hi, first)])

    def set_readouts(self, readouts) -> None:
        """The monitor's read-outs, [name, layer, weights, bias] each (none: no monitor), computed on every row
        from now on."""
        import torch

        captured = self.settings.captured_layers
        missing = sorted({int(layer) for _, layer, _, _ in readouts} - set(captured))
        if missing:
            raise ValueError(f"read-outs at layers {missing}, which this engine does not capture ({captured})")
        self._readouts = [(str(name), captured.index(int(layer)), torch.tensor(weights, dtype=torch.float32),
                           float(bias)) for name, layer, weights, bias in readouts]

    def score_tokens(self, request_id: str, tokens: dict) -> None:
        """Score these tokens of a request's prompt ({position: token}) from the rows before them, as if sampled."""
        self.requests.setdefault(request_id, _Request()).score_tokens.update({int(k): int(v) for k, v in tokens.items()})

    def add_step(self, order, counts, starts, states, logits, hidden=None, head=None, positions=None) -> None:
        """One forward: states (rows, captured layers, d) of the flattened batch, logits (requests, vocab), one
        row each; hidden and head (the final hidden states and the LM head) score prompt tokens asked for;
        positions: step_rows(counts, starts), where the caller has them already."""
        import torch

        self._settle()  # the last step's rows have long arrived: filed before this step's
        positions = step_rows(counts, starts) if positions is None else positions
        states = states[: len(positions)]
        words, ready = host_copy(states[:, self.stored] if len(self.stored) < states.shape[1] else states,
                                 self.settings.store_dtype)
        store = getattr(torch, self.settings.store_dtype)  # read out what is stored, as `tribunal score` would
        readouts = {name: (states[:, k].to(store).float() @ w.to(states.device) + b).cpu().numpy()
                    for name, k, w, b in self._readouts}
        ends = np.cumsum(np.asarray(counts, np.int64))
        filing = []
        for i, request_id in enumerate(order):  # a request's rows are contiguous, in the order of `order`
            lo, hi = int(ends[i] - counts[i]), int(ends[i])
            if lo == hi:
                continue
            request = self.requests.setdefault(request_id, _Request())
            filing.append((request, lo, hi, int(positions[lo])))
            if readouts:
                request.fresh_rows.append((positions[lo:hi], {name: v[lo:hi] for name, v in readouts.items()}))
            if request.score_tokens and hidden is not None:
                self._score_prompt(request, positions[lo:hi], np.arange(lo, hi), hidden, head)
        self._arriving.append((ready, words, filing))
        if ready is None:
            self._settle()
        scaled = logits.float() / max(self.settings.temperature, 1e-6)  # a new tensor: the sampler edits its own
        lse = scaled.logsumexp(-1)
        entropy = lse - (scaled.softmax(-1) * scaled).sum(-1)
        ends = np.asarray(starts, np.int64) + np.asarray(counts, np.int64)  # the position a row's sample takes
        self._pending = (list(order), ends, scaled, lse, entropy)

    def _settle(self) -> None:
        """File the rows that have arrived from the device under their requests (waiting for copies in flight)."""
        for ready, words, filing in self._arriving:
            if ready is not None:
                ready()
            for request, lo, hi, first in filing:
                request.rows.put(first, words[lo:hi])
        self._arriving = []

    def _score_prompt(self, request: _Request, positions, rows, hidden, head) -> None:
        import torch

        wanted = [(r, int(q) + 1) for r, q in zip(rows, positions) if int(q) + 1 in request.score_tokens]
        if not wanted:
            return
        at = torch.as_tensor([r for r, _ in wanted], device=hidden.device)
        with torch.no_grad():
            scaled = head(hidden[at]).float() / max(self.settings.temperature, 1e-6)
        lse = scaled.logsumexp(-1)
        entropy = (lse - (scaled.softmax(-1) * scaled).sum(-1)).cpu().numpy()
        tokens = [request.score_tokens[q] for _, q in wanted]
        picked = (scaled[torch.arange(len(wanted), device=hidden.device), torch.as_tensor(tokens, device=hidden.device)]
                  - lse).cpu().numpy()
        for k, (_, q) in enumerate(wanted):
            request.scores[q] = request.fresh_scores[q] = (tokens[k], float(picked[k]), float(entropy[k]))

    def add_samples(self, req_ids, sampled_token_ids) -> None:
        """The tokens the sampler drew from the pending step's rows (an empty list: a row vLLM discarded)."""
        import torch

        if self._pending is None:
            return
        order, ends, scaled, lse, entropy = self._pending
        self._pending = None
        row_of = {request_id: i for i, request_id in enumerate(order)}
        rows, tokens = [], []
        for request_id, sampled in zip(req_ids, sampled_token_ids):
            if sampled and request_id in row_of:
                rows.append(row_of[request_id])
                tokens.append(int(sampled[0]))
        if not rows:
            return
        at = torch.as_tensor(rows, device=scaled.device)
        picked = scaled[at, torch.as_tensor(tokens, device=scaled.device)] - lse[at]
        logprobs, entropies = picked.cpu().numpy(), entropy[at].cpu().numpy()
        for k, (row, token) in enumerate(zip(rows, tokens)):
            request = self.requests.setdefault(order[row], _Request())
            request.scores[int(ends[row])] = scored = (token, float(logprobs[k]), float(entropies[k]))
            if self._readouts:
                request.fresh_scores[int(ends[row])] = scored

    def drain(self) -> dict:
        """What the monitor reads, per request, since the last drain: {positions, one list per read-out, scores
        {position: [token, logprob, entropy]}} (empty without read-outs)."""
        out = {}
        for request_id, request in self.requests.items():
            if not request.fresh_rows and not request.fresh_scores:
                continue
            positions = [int(q) for p, _ in request.fresh_rows for q in p]
            entry = {"positions": positions, "scores": {str(k): list(v) for k, v in request.fresh_scores.items()}}
            for name, _, _, _ in self._readouts:
                entry[name] = [float(x) for _, values in request.fresh_rows for x in values[name]]
            out[request_id] = entry
            request.fresh_rows, request.fresh_scores = [], {}
        return out

    def take(self, request_ids) -> list:
        """Per request id: {positions, states (bytes), shape, dtype, scores {position: [token, logprob, entropy]}}
        as plain types, its rows in position order (a position computed twice, after vLLM preempted and
        recomputed the request: the last one, the state the later tokens attended to)."""
        self._settle()
        out = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None) or _Request()
            positions, states = request.rows.positions_and_words(len(self.settings.layers))
            out.append({"positions": positions.tolist(), "states": states.tobytes(), "shape": list(states.shape),
                        "dtype": str(states.dtype),
                        "scores": {str(k): list(v) for k, v in sorted(request.scores.items())}})
        return out


def check_runner(runner) -> None:
    """Refuse a model runner that does not keep what the capture reads (another vLLM version or runner)."""
    missing = [name for name in RUNNER_ATTRIBUTES if not hasattr(runner, name)]
    if missing:
        raise RuntimeError(f"tribunal's inline capture cannot read this vLLM model runner ({type(runner).__name__} "
                           f"has no {', '.join(missing)}): use --capture forward, or vLLM 0.32 with "
                           "VLLM_USE_V2_MODEL_RUNNER=0")


class CaptureMixin:
    """Mixed into vLLM's worker: aux hidden states at tribunal's layers, a CaptureSink fed every step."""

    def load_model(self, *args, **kwargs):
        runner = self.model_runner
        check_runner(runner)
        settings = CaptureSettings.from_config(self.vllm_config.additional_config)
        runner.use_aux_hidden_state_outputs = True  # read by load_model and by the compiled forward's unpacking
        super().load_model(*args, **kwargs)
        # vLLM's aux index i+1 is the sum after decoder layer i (index 0 is the embeddings)
        runner.get_model().set_aux_hidden_state_layers(tuple(layer + 1 for layer in settings.captured_layers))
        self.tribunal_sink = CaptureSink(settings)

    def execute_model(self, scheduler_output):
        output = super().execute_model(scheduler_output)
        runner = self.model_runner
        state = getattr(runner, "execute_model_state", None)
        total = scheduler_output.total_num_scheduled_tokens
        if output is None and state is not None and state.scheduler_output is scheduler_output and total > 0:
            batch = runner.input_batch
            order = list(batch.req_ids[: len(scheduler_output.num_scheduled_tokens)])
            counts = [scheduler_output.num_scheduled_tokens[r] for r in order]
            starts = batch.num_computed_tokens_cpu[: len(order)].copy()
            positions = step_rows(counts, starts)
            if not np.array_equal(positions, runner.positions[:total].cpu().numpy()):
                raise RuntimeError("tribunal's inline capture mapped this step's tokens to other positions than "
                                   "vLLM's runner did: use --capture forward and report the vLLM version")
            import torch

            states = torch.stack([h[:total] for h in state.aux_hidden_states], 1)
            self.tribunal_sink.add_step(order, counts, starts, states, state.logits, state.hidden_states,
                                        runner.get_model().compute_logits, positions)
        return output

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        if output is not None and hasattr(output, "sampled_token_ids"):
            self.tribunal_sink.add_samples(output.req_ids, output.sampled_token_ids)
        return output

    def tribunal_take(self, request_ids):
        return self.tribunal_sink.take(request_ids)

    def tribunal_drain(self):
        return self.tribunal_sink.drain()

    def tribunal_readouts(self, readouts):
        self.tribunal_sink.set_readouts(readouts)

    def tribunal_score_tokens(self, request_id, tokens):
        self.tribunal_sink.score_tokens(request_id, tokens)


def __getattr__(name):
    """The worker classes, built on first use: importing vLLM's CPU worker on a GPU build (or the reverse) is not
    safe, and only the one vLLM names is ever resolved."""
    if name == "CaptureCPUWorker":
        from vllm.v1.worker.cpu_worker import CPUWorker

        return type("CaptureCPUWorker", (CaptureMixin, CPUWorker), {"__module__": __name__})
    if name == "CaptureGPUWorker":
        from vllm.v1.worker.gpu_worker import Worker

        return type("CaptureGPUWorker", (CaptureMixin, Worker), {"__module__": __name__})
    raise AttributeError(name)

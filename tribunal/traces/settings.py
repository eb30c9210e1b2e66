"""The generator's options, defined once: defaults and help here; the click options of `generate` and `run`,
the keys of --config files and the arguments that `tribunal slurm submit` writes into its sbatch script are
all derived from this dataclass."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from ..config import parse_budget
from ..errors import TribunalError

DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
COMPUTE_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ENGINE_CHOICES = ("hf", "vllm")
CAPTURE_CHOICES = ("inline", "forward")
# vLLM engine arguments that tribunal derives from its own options (engines/vllm.py), and from which
VLLM_ARGS_SET_BY_TRIBUNAL = {
    "model": "--model", "tokenizer": "--model", "revision": "--revision", "tokenizer_revision": "--revision",
    "dtype": "--compute-dtype", "seed": "--seed", "gpu_memory_utilization": "--vllm-memory",
    "max_model_len": "--max-new-tokens (tribunal sizes it from the prompts)",
    "trust_remote_code": "--trust-remote-code", "logprobs_mode": "--capture",
    "worker_cls": "--capture", "additional_config": "--capture", "enable_prefix_caching": "--capture",
    "async_scheduling": "--capture"}
EXIT_RULES = ("probe", "confidence")
EXIT_ANSWERS = ("intermediate", "forced")


def option(default, help: str, **cli):
    """A field with its command-line help. cli: choices=..., secondary='--no-x' (an on/off pair), cli=False
    (not a command-line option), per_shard=True (set by the cluster launcher per task, not by the user)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class GenerateConfig:
    out: str = option(MISSING, "Store file to write (resumed if it exists).", cli=False)
    model: str | None = option(None, "Hugging Face id or local path (default: the embedded model).")
    engine: str = option("hf", "Sampler: hf (tribunal's decode loop, captures while it decodes; runs anywhere) or "
                               "vllm (vLLM samples and captures, see --capture; pip install 'tribunal[vllm]').",
                         choices=ENGINE_CHOICES)
    capture: str = option("inline", "--engine vllm: inline (activations, log-probs and entropies taken inside vLLM's "
                                    "own forward as it samples: no second pass) or forward (vLLM samples, then one "
                                    "teacher-forced transformers pass captures: for models or vLLM versions inline "
                                    "cannot hook). The hf engine always captures as it decodes.",
                          choices=CAPTURE_CHOICES)
    vllm_memory: float = option(0.5, "--engine vllm: the fraction of the GPU's memory vLLM takes (its "
                                     "gpu_memory_utilization; on a CPU, of the RAM free when it starts); the model "
                                     "that captures uses the rest.")
    vllm_args: str | None = option(None, "--engine vllm: more of vLLM's engine arguments as a JSON object, e.g. "
                                         "'{\"tensor_parallel_size\": 2, \"max_num_seqs\": 64}' (not those tribunal "
                                         "sets from its own options).")
    revision: str | None = option(None, "Model revision on the hub (commit, tag, branch).")
    dataset: str | None = option(None, "Hub id (openai/gsm8k) or local .jsonl/.json/.parquet (default: embedded problems).")
    split: str = option("test", "Dataset split.")
    layers: str | None = option(None, "e.g. 12,16,20 or 10-20 or all (default: the study's middle layers, scaled).")
    temperature: float = option(1.0, "Sampling temperature.")
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.")
    max_new_tokens: int = option(512, "Generated tokens per trace at most (a trace cut there is `length`).")
    samples_per_problem: int = option(4, "Traces sampled per problem.")
    batch_size: int = option(16, "hf engine: traces per batch (halved on a CUDA out-of-memory; capped by "
                                  "--capture-memory). vllm batches by itself.")
    capture_memory: str = option("auto", "Bound on captured activations held at once (hf: device buffer and host copies "
                                         "together; vllm inline: the rows of the requests in flight; vllm forward: the "
                                         "teacher-forced forward's batch), e.g. 8G; smaller batches or fewer requests "
                                         "when long traces x layers x d_model would exceed it. auto: 8G for hf, 2G for "
                                         "vllm inline; for vllm forward half of the capture device's free memory once "
                                         "vLLM started (CPU: 2G).")
    target_correct: int = option(50, "Stop storing correct traces after this many.")
    target_incorrect: int = option(50, "Stop storing incorrect traces after this many.")
    max_problems: int = option(200, "Try at most this many problems (all shards together).")
    keep_all: bool = option(False, "Store every trace, even past the targets.")
    shard: str = option("0/1", "i/N: take problems whose index = i (mod N).", per_shard=True)
    seed: int = option(0, "Run seed; each trace's seed derives from (run seed, problem, sample); `run` seeds its probes with it too.")
    dtype: str = option("auto", "Storage dtype; auto = bfloat16 for bf16 models (lossless), else float16.",
                        choices=DTYPE_CHOICES)
    compute_dtype: str = option("auto", "Model dtype (auto: bfloat16 or float16 on a GPU, float32 on a CPU).",
                                 choices=COMPUTE_DTYPE_CHOICES)
    device_map: str | None = option(None, "auto, cpu, cuda, or a JSON map / .json file (accelerate).")
    trust_remote_code: bool = option(False, "Allow the model repo's own code (off by default).")
    prompt_template: str | None = option(None, "Prompt with {question}; default R1-style for chat models.")
    chat_template: bool | None = option(None, "Use the tokenizer's chat template (default: if it has one).",
                                        secondary="--no-chat-template")
    monitor: str | None = option(None, "Probes folder (from `tribunal probe chunks` / `probe tokens`): while sampling, "
                                       "score every chunk end that states an answer with its chunk direction and every "
                                       "generated token with its token direction; stored with each trace (hf engine, or "
                                       "vllm with --capture inline).")
    exit_policy: str | None = option(None, "Probes folder: stop each trace's thinking at the first chunk end that states "
                                           "an answer where --exit-rule reaches --exit-threshold (monitors as well; hf "
                                           "engine, or vllm with --capture inline).")
    exit_rule: str = option("probe", "Exit policy (generate --exit-policy, run --early-exit): probe (the chunk "
                                     "probe's probability) or confidence (exp of the mean log-prob over the chunk).",
                            choices=EXIT_RULES)
    exit_threshold: str = option("auto", "Exit policy: a number in [0, 1]; auto (the threshold `probe chunks` chose on "
                                         "all problems); conformal:EPS or conformal:EPS:DELTA (accuracy lost against "
                                         "the full traces <= EPS with probability 1-DELTA, default 0.1: split-conformal "
                                         "risk control on the probing store's problems).")
    exit_answer: str = option("intermediate", "Exit policy: intermediate (the exit chunk's answer is the trace's) or "
                                              "forced (append the end of thinking and an answer cue; the model answers "
                                              "within --exit-answer-budget tokens, counted in the cost).",
                              choices=EXIT_ANSWERS)
    exit_answer_budget: int = option(16, "Exit policy, --exit-answer forced: tokens the model may write after the cue.")
    intervention: dict | None = option(None, "tribunal steer's arm: {kind: add|ablate, layer, vector, ...what describes "
                                             "them}, applied at every generated position (traces/intervention.py); "
                                             "recorded in the store without the vector.", cli=False)
    queue_batches: int = option(2, "Batches waiting for the store writer at most.", cli=False)
    durable: bool = option(True, "fsync each commit.", cli=False)
    progress: bool = option(True, "Show a progress bar.", cli=False)

    @classmethod
    def cli_fields(cls):
        """The fields that are command-line options (and --config keys), in declaration order."""
        return [f for f in fields(cls) if f.metadata.get("cli", True)]

    @classmethod
    def arguments(cls, values: dict, skip_per_shard: bool = True) -> list[str]:
        """`tribunal generate` arguments for the options in `values` that differ from their defaults."""
        args = []
        for f in cls.cli_fields():
            if f.name not in values or (skip_per_shard and f.metadata.get("per_shard")):
                continue
            value = values[f.name]
            if value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", "bool | None"):
                args.append(flag if value else f.metadata.get("secondary", ""))
            else:
                args += [flag, str(value)]
        return [a for a in args if a]

    def shard_pair(self) -> tuple[int, int]:
        try:
            i, n = (int(x) for x in str(self.shard).split("/"))
        except ValueError:
            raise TribunalError(f"--shard {self.shard!r}: use i/N, e.g. 0/4") from None
        if n < 1 or not 0 <= i < n:
            raise TribunalError(f"--shard {self.shard!r}: need 0 <= i < N")
        return i, n

    def vllm_engine_args(self) -> dict:
        """--vllm-args as a dict, refusing what tribunal sets itself (the option that sets it is named)."""
        import json

        try:
            extra = json.loads(self.vllm_args) if self.vllm_args else {}
        except ValueError as error:
            raise TribunalError(f"--vllm-args {self.vllm_args!r} is not JSON ({error}): give an object, e.g. "
                                "'{\"max_num_seqs\": 64}'") from None
        if not isinstance(extra, dict):
            raise TribunalError(f"--vllm-args {self.vllm_args!r}: give a JSON object of vLLM engine arguments")
        taken = sorted(set(extra) & set(VLLM_ARGS_SET_BY_TRIBUNAL))
        if taken:
            raise TribunalError(f"--vllm-args sets {', '.join(taken)}, which tribunal sets itself: use "
                                + ", ".join(sorted({VLLM_ARGS_SET_BY_TRIBUNAL[k] for k in taken})))
        return extra

    def validate(self) -> "GenerateConfig":
        if not self.temperature > 0:
            raise TribunalError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TribunalError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise TribunalError(f"--seed must be 0 or more, got {self.seed}")
        for name in ("max_new_tokens", "samples_per_problem", "batch_size", "max_problems"):
            if getattr(self, name) < 1:
                raise TribunalError(f"--{name.replace('_', '-')} must be at least 1")
        try:
            parse_budget(self.capture_memory)
        except ValueError:
            raise TribunalError(f"--capture-memory {self.capture_memory!r}: give a size such as 4G or 512M, or auto") from None
        if self.engine not in ENGINE_CHOICES:
            raise TribunalError(f"--engine {self.engine!r}: choose {', '.join(ENGINE_CHOICES)}")
        if self.capture not in CAPTURE_CHOICES:
            raise TribunalError(f"--capture {self.capture!r}: choose {', '.join(CAPTURE_CHOICES)}")
        if self.engine == "hf" and self.capture != "inline":
            raise TribunalError("--capture forward is for --engine vllm (the hf engine captures as it decodes)")
        if self.vllm_args is not None:
            if self.engine != "vllm":
                raise TribunalError("--vllm-args is for --engine vllm")
            self.vllm_engine_args()
        if not 0 < self.vllm_memory < 1:
            raise TribunalError(f"--vllm-memory must be a fraction in (0, 1), got {self.vllm_memory}")
        if self.compute_dtype not in COMPUTE_DTYPE_CHOICES:
            raise TribunalError(f"--compute-dtype {self.compute_dtype!r}: choose {', '.join(COMPUTE_DTYPE_CHOICES)}")
        if self.dtype not in DTYPE_CHOICES:
            raise TribunalError(f"--dtype {self.dtype!r}: choose {', '.join(DTYPE_CHOICES)}")
        self.shard_pair()
        self._validate_exit()
        return self

    def _validate_exit(self) -> None:
        exit_options = [name for name in ("exit_rule", "exit_threshold", "exit_answer", "exit_answer_budget")
                        if getattr(self, name) != type(self).__dataclass_fields__[name].default]
        if exit_options and not self.exit_policy:
            raise TribunalError(f"--{exit_options[0].replace('_', '-')} needs --exit-policy PROBES_DIR")
        if (self.monitor or self.exit_policy) and self.engine == "vllm" and self.capture != "inline":
            raise TribunalError("--monitor and --exit-policy read the states as vLLM computes them: use --capture "
                                "inline (or --engine hf)")
        if self.monitor and self.exit_policy and str(self.monitor) != str(self.exit_policy):
            raise TribunalError("--monitor and --exit-policy name different probes folders; give one (the exit "
                                "policy monitors with its own probes)")
        if self.intervention is not None and (self.engine != "hf" or self.monitor or self.exit_policy):
            raise TribunalError("steering runs on the hf engine without --monitor or --exit-policy")
        if self.exit_rule not in EXIT_RULES:
            raise TribunalError(f"--exit-rule {self.exit_rule!r}: choose {', '.join(EXIT_RULES)}")
        if self.exit_answer not in EXIT_ANSWERS:
            raise TribunalError(f"--exit-answer {self.exit_answer!r}: choose {', '.join(EXIT_ANSWERS)}")
        if self.exit_answer_budget < 1:
            raise TribunalError("--exit-answer-budget must be at least 1")
        if self.exit_policy:
            from ..probes.exit_policy import parse_threshold

            parse_threshold(self.exit_threshold)

"""Problems: GSM8K from the hub or a local file (question / answer with `#### N`), MATH/AIME-style local files
(problem / answer in LaTeX), and their prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TribunalError
from ..grading import parse_gold

EMBEDDED_PROBLEMS = Path(__file__).resolve().parents[1] / "embedded" / "problems" / "test.jsonl"
GSM8K_HUB_ID = "openai/gsm8k"

# R1 style: reason step by step, final answer in \boxed{} (the DeepSeek-R1 recommended prompt).
DEFAULT_CHAT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
DEFAULT_PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Problem:
    problem_id: int
    question: str
    gold: str


def _local_file(source: str, split: str) -> Path:
    """The file a local dataset spec names (a folder holds one file per split)."""
    path = Path(source)
    if path.is_dir():
        candidates = [path / f"{split}{ext}" for ext in (".jsonl", ".json", ".parquet")]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise TribunalError(f"{source} has no {split}.jsonl/.json/.parquet; give the file or another --split")
        path = found[0]
    return path


def dataset_identity(source: str | None, split: str = "test") -> str:
    """What a resume must match: a hub id as given; a local file by name and content hash, so the same file
    spelled another way (or copied, or read from another working directory) is the same dataset."""
    if source is None:
        return EMBEDDED_PROBLEMS.name
    path = _local_file(str(source), split) if Path(str(source)).exists() else None
    if path is None:
        return str(source)
    import hashlib

    return f"{path.name}@sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


def _read_rows(source: str, split: str) -> list[dict]:
    path = _local_file(source, split)
    if path.exists():
        if path.suffix == ".jsonl":
            with open(path) as fh:
                return [json.loads(line) for line in fh if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return data if isinstance(data, list) else data.get(split, data.get("data", []))
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        raise TribunalError(f"{source}: use a .jsonl, .json or .parquet file")
    if "/" not in source and not source.startswith("openai"):
        raise TribunalError(f"dataset {source!r} is neither a file nor a Hugging Face id like {GSM8K_HUB_ID}")
    try:
        import datasets

        config = "main" if source == GSM8K_HUB_ID else None
        return list(datasets.load_dataset(source, config, split=split))
    except Exception as exc:  # network, missing split, unknown id: all user-fixable
        raise TribunalError(
            f"cannot load dataset {source!r} split {split!r} from the hub ({str(exc).splitlines()[0]}); "
            "offline, pass a local .jsonl with question/answer fields"
        ) from None


def load_problems(source: str | None = None, split: str = "test") -> list[Problem]:
    """Problems in dataset order; problem_id is the row index in the split."""
    rows = _read_rows(str(source or EMBEDDED_PROBLEMS), split)
    if not rows:
        raise TribunalError(f"dataset {source} split {split} has no rows")
    question = next((k for k in ("question", "problem") if k in rows[0]), None)
    if question is None or not any(k in rows[0] for k in ("answer", "solution")):
        raise TribunalError(
            f"dataset {source} rows lack a question or an answer field; it has {sorted(rows[0])}. tribunal reads "
            "GSM8K's 'question' and 'answer' (ending in '#### N'), or MATH/AIME-style 'problem' and 'answer' "
            "(LaTeX) or 'solution' (with a \\boxed{} answer)"
        )
    problems = []
    for i, row in enumerate(rows):
        try:
            answer = row.get("answer") if row.get("answer") not in (None, "") else row.get("solution")
            if answer is None:
                raise ValueError("the row has neither an answer nor a solution")
            problems.append(Problem(i, row[question], parse_gold(str(answer))))
        except ValueError as exc:
            raise TribunalError(f"dataset {source} row {i}: {exc}") from None
    return problems


def shard_problems(problems: list[Problem], shard: int, num_shards: int, max_problems: int | None) -> list[Problem]:
    """Problems with index < max_problems and index = shard (mod num_shards): N shards cover them once."""
    if not 0 <= shard < num_shards:
        raise TribunalError(f"--shard {shard}/{num_shards}: need 0 <= i < N")
    limit = len(problems) if max_problems is None else min(max_problems, len(problems))
    return [p for p in problems[:limit] if p.problem_id % num_shards == shard]


def build_prompt(tokenizer, question: str, template: str | None = None, use_chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt: the model's chat template when it has one (R1 style), a plain one otherwise."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_chat if use_chat_template is None else (use_chat_template and has_chat)
    if use_chat:
        content = (template or DEFAULT_CHAT_TEMPLATE).format(question=question)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = (template or DEFAULT_PLAIN_TEMPLATE).format(question=question)
    return list(tokenizer(text)["input_ids"])

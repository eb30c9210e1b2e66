"""Loading problems (tribunal.problems.loading): GSM8K's own files (a 200-row sample in tests/data), local .json and
.parquet datasets, and the prompt built from a question, with the chat template where the tokenizer has one."""

import json

from conftest import GSM8K
from tribunal.problems.loading import build_prompt, load_problems
from tribunal.store import open_store
from tribunal.traces.generate import GenerateConfig, run_generation


def test_real_gsm8k_test_file(tmp_path, tiny_model):
    problems = load_problems(str(GSM8K / "test.jsonl"))
    assert len(problems) == 200 and problems[0].gold == "18"
    assert load_problems(str(GSM8K), split="train")[0].question.startswith("Natalia")
    run_generation(GenerateConfig(out=str(tmp_path / "g.h5"), model=str(tiny_model), dataset=str(GSM8K / "test.jsonl"),
                                  layers="1,3", max_new_tokens=8, samples_per_problem=1, max_problems=2, keep_all=True,
                                  progress=False))
    with open_store(tmp_path / "g.h5") as store:
        assert store.n_traces == 2 and store.trace(0).gold == "18"
        assert store.attrs["dataset_id"].endswith("test.jsonl")


def test_local_json_and_parquet_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:5]]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        problems = load_problems(str(tmp_path / name))
        assert [p.gold for p in problems] == [load_problems(str(GSM8K / "test.jsonl"))[i].gold for i in range(5)]


def test_prompt_uses_the_chat_template_when_there_is_one():
    from transformers import AutoTokenizer

    from tribunal.traces.models import EMBEDDED_MODEL

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    r1 = tok.decode(build_prompt(tok, "What is 2+2?"))  # the embedded model's own template is R1's
    assert r1.startswith("<\uff5cbegin\u2581of\u2581sentence\uff5c><\uff5cUser\uff5c>What is 2+2?\nPlease reason")
    assert r1.endswith("<\uff5cAssistant\uff5c><think>\n")
    tok.chat_template = None
    plain = tok.decode(build_prompt(tok, "What is 2+2?"))
    assert plain == "Question: What is 2+2?\nAnswer:"
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|><think>\n"
    chat = tok.decode(build_prompt(tok, "What is 2+2?"))
    assert chat.startswith("<|user|>What is 2+2?\nPlease reason step by step") and "\\boxed{}" in chat
    assert chat.rstrip().endswith("<|assistant|><think>")
    assert tok.decode(build_prompt(tok, "Q", use_chat_template=False)) == "Question: Q\nAnswer:"
    assert tok.decode(build_prompt(tok, "Q", template="Solve: {question}")).startswith("<|user|>Solve: Q<|assistant|>")


MATH_ROWS = [
    {"problem": "Simplify $\\frac{\\sqrt{8}}{4}$.", "answer": "\\frac{\\sqrt{2}}{2}"},
    {"problem": "Solve $1 < x \\le 2$ as an interval.", "answer": "(1, 2]"},
    {"problem": "Expand $(x+1)^2 - 2x$.", "answer": "x^2 + 1"},
    {"problem": "AIME: find the remainder when $2^{10}$ is divided by 1000.", "answer": "24"},
    {"problem": "What is $\\frac{3}{4}$ as a decimal?", "solution": "We divide: $3/4 = \\boxed{0.75}$."},
]


def test_math_style_file_loads_with_latex_golds(tmp_path):
    """MATH/AIME-style files: `problem` with a LaTeX `answer` kept as written, or a `solution` whose \\boxed{} is
    the gold."""
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MATH_ROWS))
    problems = load_problems(str(path))
    assert [p.gold for p in problems] == ["\\frac{\\sqrt{2}}{2}", "(1, 2]", "x^2 + 1", "24", "0.75"]
    assert problems[0].question.startswith("Simplify")

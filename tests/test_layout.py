"""The dependency rules of the tree, checked on the source: store never imports torch/transformers, probes never
import the generator or the report, the report never the generator, only the pipeline chains them, grading stands
alone, only the CLI imports click."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tribunal"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = list(path.relative_to(PKG.parent).with_suffix("").parts[:-node.level])
                mod = ".".join(base + ([mod] if mod else []))
            names.add(mod)
    return names


def test_dependencies_point_one_way():
    for path in PKG.rglob("*.py"):
        found = imports(path)
        rel = path.relative_to(PKG).as_posix()
        if rel != "cli.py":
            assert not any(n.split(".")[0] == "click" for n in found), rel
        if rel.startswith("store/"):
            assert not any(n.split(".")[0] in ("torch", "transformers", "accelerate") for n in found), rel
        if rel.startswith("probes/"):  # probes return results; the report draws them
            assert not any(n.startswith(("tribunal.traces", "tribunal.report", "tribunal.pipeline")) for n in found), rel
        if rel.startswith("report/"):  # the report reads probe results, never the generator
            assert not any(n.startswith(("tribunal.traces", "tribunal.pipeline")) for n in found), rel
        if rel.startswith("store/"):  # the store is upstream of everything but problems
            assert not any(n.startswith(("tribunal.traces", "tribunal.probes", "tribunal.report")) for n in found), rel
        chains = {"tribunal.traces", "tribunal.probes"} <= {".".join(n.split(".")[:2]) for n in found}
        assert not chains or rel in ("pipeline.py", "cli.py"), f"{rel}: only the pipeline chains generation and probes"
        if rel == "grading.py":
            assert not any(n.startswith("tribunal") for n in found), rel


def test_prompt_uses_the_chat_template_when_there_is_one():
    from transformers import AutoTokenizer

    from tribunal.problems.loading import build_prompt
    from tribunal.traces.models import EMBEDDED_MODEL

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    plain = tok.decode(build_prompt(tok, "What is 2+2?"))
    assert plain == "Question: What is 2+2?\nAnswer:"
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|><think>\n"
    chat = tok.decode(build_prompt(tok, "What is 2+2?"))
    assert chat.startswith("<|user|>What is 2+2?\nPlease reason step by step") and "\\boxed{}" in chat
    assert chat.rstrip().endswith("<|assistant|><think>")
    assert tok.decode(build_prompt(tok, "Q", use_chat_template=False)) == "Question: Q\nAnswer:"
    assert tok.decode(build_prompt(tok, "Q", template="Solve: {question}")).startswith("<|user|>Solve: Q<|assistant|>")

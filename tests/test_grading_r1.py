"""Grading real reasoning-model output: an R1-Distill-style chat template opens thinking in the prompt, so the
generated text has `</think>` but no `<think>`, and a trace cut mid-thought has no answer."""

import pytest
from transformers import AutoTokenizer

from tribunal.grading import extract_answer, grade, prompt_opens_thinking
from tribunal.problems.loading import build_prompt
from tribunal.store import open_store
from tribunal.traces.generate import GenerateConfig, run_generation
from tribunal.traces.models import EMBEDDED_MODEL

# In the style of DeepSeek-R1-Distill-Qwen's tokenizer_config.json: the generation prompt ends with <think>\n.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<\uff5cUser\uff5c>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<\uff5cAssistant\uff5c>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<\uff5cAssistant\uff5c><think>\\n' }}{% endif %}"
)
# A template that closes thinking itself (some "no-think" variants) and a plain one without any.
CLOSED_TEMPLATE = R1_TEMPLATE.replace("<think>\\n' }}", "<think>\\n\\n</think>\\n\\n' }}")
PLAIN_TEMPLATE = R1_TEMPLATE.replace("<think>\\n' }}", "' }}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)


def rendered(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer.decode(build_prompt(tokenizer, "Janet has 16 eggs...", use_chat_template=True),
                            skip_special_tokens=False)


def test_thinking_is_read_from_the_rendered_prompt(tokenizer):
    prompt = rendered(tokenizer, R1_TEMPLATE)
    assert prompt.rstrip().endswith("<think>") and prompt_opens_thinking(prompt)
    assert not prompt_opens_thinking(rendered(tokenizer, CLOSED_TEMPLATE))
    assert not prompt_opens_thinking(rendered(tokenizer, PLAIN_TEMPLATE))
    assert not prompt_opens_thinking("Question: 2+2?\nAnswer:")


# (generated text after an R1 prompt, finished, gold, label)
R1_OUTPUTS = [
    ("Okay, 16 - 3 - 4 = 9 eggs, maybe \\boxed{7}? Wait, times 6 gives", False, "42", "unparsed"),
    ("Okay, 16 - 3 - 4 = 9, and 9 * 2 = 18. So the answer is 18.", False, "18", "unparsed"),  # cut mid-thought
    ("So the answer is 18.", True, "18", "unparsed"),  # stopped without closing its thinking: no answer
    ("9 * 2 = 18, maybe \\boxed{17}.\n</think>\n\nShe makes \\boxed{18} dollars.", True, "18", "correct"),
    ("So 18? No wait, 9*2=18.\n</think>\n\n**Final Answer**\n\\boxed{20}", True, "18", "incorrect"),
    ("It is 42.\n</think>\n\nThe total is 42 dollars.", True, "42", "correct"),
    ("It is 42.\n</think>\n\nThe total is 42 dol", False, "42", "unparsed"),  # answer cut off: no last-number guess
    ("It is 42.\n</think>\n\nThe answer is \\boxed{42}", False, "42", "correct"),  # boxed before the cut
    ("The count is 42\n</think>\n", True, "42", "unparsed"),  # thought, then said nothing
]


@pytest.mark.parametrize("text,finished,gold,label", R1_OUTPUTS)
def test_r1_outputs(text, finished, gold, label):
    assert grade(text, gold, finished=finished, thinking=True) == label


def test_unfinished_thinking_is_not_an_answer():
    assert grade("<think>\u2026 maybe \\boxed{7}? Wait, times 6 gives", "42") == "unparsed"
    assert grade("<think>\u2026 maybe \\boxed{42}? Wait, times 6 gives", "42") == "unparsed"


def test_no_thinking_markers_keep_the_plain_rules():
    assert extract_answer("He has 5 apples and buys 3 more, so he has 8 apples.") == "8"
    assert extract_answer("He has 5 apples and buys 3 more, so he has 8 apples.", thinking=True) is None


def test_generator_grades_with_the_prompts_thinking(tmp_path, tiny_model, small_problems):
    """A tiny random model behind an R1 template never closes its thinking in 24 tokens: every trace is
    unparsed, although the texts hold numbers the old grader took as answers; the store records both the
    thinking prompt and each finish reason."""
    import json

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = R1_TEMPLATE
    model_dir = tmp_path / "r1-model"
    import shutil

    shutil.copytree(tiny_model, model_dir)
    tok.save_pretrained(model_dir)
    summary = run_generation(GenerateConfig(out=str(tmp_path / "r1.h5"), model=str(model_dir), dataset=str(small_problems),
                                            layers="1", max_new_tokens=24, samples_per_problem=2, batch_size=4,
                                            max_problems=6, keep_all=True, progress=False))
    assert summary["status"] == "done"
    with open_store(tmp_path / "r1.h5") as store:
        settings = store.attrs["generation_settings"]
        settings = json.loads(settings) if isinstance(settings, str) else settings
        assert settings["prompt_opens_thinking"] is True
        texts = [store.trace(i) for i in range(store.n_traces)]
    assert all(t.label == "unparsed" for t in texts if "</think>" not in t.text)
    assert {t.finish_reason for t in texts} <= {"stop", "length"}
    with_numbers = [t for t in texts if any(ch.isdigit() for ch in t.text)]
    assert with_numbers, "the random model wrote no digit at all; the check above proves nothing"
    # a grader blind to thinking and to the finish reason would have labelled some of them
    assert any(extract_answer(t.text) is not None for t in with_numbers)

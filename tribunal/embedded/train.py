"""Train the embedded default model: a tiny Llama that thinks like R1 and solves synthetic word problems about half
the time.

    python -m tribunal.embedded.train [--out tribunal/embedded] [--seed 0]

Seeded and CPU-only, one thread (800 steps, 26 minutes on a busy 2-core machine; about 19 unloaded). The
tokenizer carries a chat template in R1's shape whose generation prompt ends with `<think>\\n`; the model is
trained on exactly the prompt `tribunal generate` builds (problems.loading.build_prompt) followed by a synthetic
R1-shaped trace (problems/synthetic.py: steps in paragraphs, slips caught by "Wait", re-checks, `</think>`,
`\\boxed{}`). It writes, next to this file:
  model/     the model and its tokenizer in Hugging Face format (float16 safetensors, a few MB), loaded by
             `tribunal generate` through the same from_pretrained path as any model; TRAINING.json holds the
             data recipe and what the trained model does at temperature 1 (accuracy, tokens, graded chunks);
  problems/  test.jsonl, the default dataset (question / answer with `#### N`).
Training stops at the first evaluation after MIN_STEPS where sampled accuracy at temperature 1 reaches
TARGET_ACCURACY[0], so the model's traces are a real mix of right and wrong.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..chunks import DEFAULT_CUES, intermediate_answers
from ..grading import THINK_CLOSE, THINK_OPEN, grade
from ..problems.loading import build_prompt
from ..problems.synthetic import RECIPE, make_problems

HERE = Path(__file__).resolve().parent
TARGET_ACCURACY = (0.4, 0.6)
MIN_STEPS = 300
VOCAB = 512
MAX_NEW_TOKENS = 192  # evaluation budget; the longest training trace is well under it
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# DeepSeek-R1-Distill's template, cut to what the embedded model needs: the generation prompt opens thinking.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "<think>\\n' }}{% endif %}"
)
# GPT-2's split, digits one by one (arithmetic is learnt per digit) and runs of newlines kept whole.
SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\n+|\s+(?!\S)|\s+"


def build_tokenizer(texts) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the training texts; `<think>`/`</think>` are added tokens that decode as text (as in R1)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                          use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=[PAD, BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((t.replace(THINK_OPEN, " ").replace(THINK_CLOSE, " ") for t in texts), trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in (THINK_OPEN, THINK_CLOSE)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  padding_side="left", model_max_length=1024)
    out.chat_template = CHAT_TEMPLATE
    return out


def encode(tokenizer, problem):
    """(ids, labels): the prompt `tribunal generate` builds, then the trace and end-of-sequence (the only loss)."""
    prompt = build_prompt(tokenizer, problem["question"])
    answer = tokenizer(problem["trace"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


@torch.no_grad()
def sample(model, tokenizer, problems, seed: int) -> list[tuple[str, int]]:
    """(generated text, generated tokens incl. end-of-sequence) per problem, at temperature 1."""
    model.eval()
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(problems), 50):
        chunk = problems[i : i + 50]
        prompts = [build_prompt(tokenizer, p["question"]) for p in chunk]
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        gen = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, batch["input_ids"].shape[1] :].tolist():
            n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            ids = [t for t in row[:n] if t != tokenizer.eos_token_id]
            out.append((tokenizer.decode(ids, skip_special_tokens=False), n))
    model.train()
    return out


def sampled_accuracy(model, tokenizer, problems, seed: int) -> float:
    texts = sample(model, tokenizer, problems, seed)
    return sum(grade(t, p["gold"], thinking=True) == "correct" for (t, _), p in zip(texts, problems)) / len(problems)


_CUE_START = re.compile("|".join(re.escape(c) for c in sorted(DEFAULT_CUES, key=len, reverse=True)), re.IGNORECASE)


def measure(model, tokenizer, problems, seed: int) -> dict:
    """What the model does at temperature 1, chunked by tribunal.chunks as `probe chunks` chunks it."""
    rows = []
    for (text, n), p in zip(sample(model, tokenizer, problems, seed), problems):
        chunks = intermediate_answers(text, p["gold"])
        thinking = [c for c in chunks if THINK_CLOSE not in text[: c.start]]  # chunks before the answer
        first_right = next((c for c in thinking if c.label == "correct"), None)
        rows.append(dict(
            label=grade(text, p["gold"], thinking=True), tokens=n, chunks=chunks,
            cue=any(_CUE_START.match(text[c.start :]) for c in chunks),
            closed=THINK_CLOSE in text, first_right=first_right,
            after_first_right=(len(text) - first_right.end) / len(text) if first_right else None,
        ))
    labels = [c.label for r in rows for c in r["chunks"]]
    tokens = [r["tokens"] for r in rows]
    right = [r for r in rows if r["label"] == "correct"]
    share = lambda xs: round(sum(xs) / max(1, len(xs)), 4)  # noqa: E731
    return {
        "problems": len(rows),
        "final_accuracy": share([r["label"] == "correct" for r in rows]),
        "unparsed": share([r["label"] == "unparsed" for r in rows]),
        "thinking_closed": share([r["closed"] for r in rows]),
        "generated_tokens_mean": round(statistics.mean(tokens), 2),
        "generated_tokens_median": statistics.median(tokens),
        "generated_tokens_max": max(tokens),
        "graded_chunks_per_trace_mean": round(len(labels) / len(rows), 3),
        "traces_with_2_or_more_graded_chunks": share([len(r["chunks"]) >= 2 for r in rows]),
        "chunks_right": share([x == "correct" for x in labels]),
        "chunks_wrong": share([x == "incorrect" for x in labels]),
        "traces_with_right_and_wrong_chunks": share([{c.label for c in r["chunks"]} >= {"correct", "incorrect"}
                                                      for r in rows]),
        "traces_with_a_reflection_cue": share([r["cue"] for r in rows]),
        "traces_right_before_thinking_ends": share([r["first_right"] is not None for r in rows]),
        "wrong_traces_right_before_thinking_ends": share([r["first_right"] is not None for r in rows
                                                          if r["label"] != "correct"]),
        "right_traces_text_after_first_right_chunk_mean": round(statistics.mean(
            [r["after_first_right"] for r in right if r["after_first_right"] is not None] or [0.0]), 4),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one thread: as fast as two for a model this small, and not slowed by a busy machine
    out = Path(args.out)

    train = make_problems(20000, seed=args.seed * 1000 + 1)
    held_out = make_problems(200, seed=args.seed * 1000 + 2)
    test = make_problems(500, seed=args.seed * 1000 + 3)
    tokenizer = build_tokenizer(p["question"] + "\nPlease reason step by step, and put your final answer within "
                                "\\boxed{}.\n" + p["trace"] for p in train)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    encoded = [encode(tokenizer, p) for p in train]
    rng = random.Random(args.seed)
    started, accuracy = time.time(), 0.0
    for step in range(1, args.max_steps + 1):
        batch = rng.sample(encoded, 32)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (x, y) in enumerate(batch):
            ids[j, : len(x)], labels[j, : len(y)], mask[j, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0 and not (step % args.eval_every == 0 and step >= MIN_STEPS):
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - started:.0f}s)", flush=True)
        if step % args.eval_every == 0 and step >= MIN_STEPS:
            accuracy = sampled_accuracy(model, tokenizer, held_out, seed=args.seed)
            print(f"step {step}: loss {loss.item():.3f}, sampled accuracy {accuracy:.2f} ({time.time() - started:.0f}s)",
                  flush=True)
            if accuracy >= TARGET_ACCURACY[0]:
                break
    trained_s = time.time() - started
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(torch.float16)
    figures = measure(model.float(), tokenizer, [dict(p) for p in test], seed=args.seed + 1)
    model.to(torch.float16).save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    (out / "problems").mkdir(parents=True, exist_ok=True)
    with open(out / "problems" / "test.jsonl", "w") as fh:
        for p in test:
            fh.write(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n")
    lengths = [len(tokenizer(p["trace"], add_special_tokens=False)["input_ids"]) + 1 for p in train]
    (out / "model" / "TRAINING.json").write_text(json.dumps({
        "script": "python -m tribunal.embedded.train", "seed": args.seed, "steps": step,
        "train_seconds": round(trained_s), "held_out_sampled_accuracy": accuracy,
        "target_accuracy": list(TARGET_ACCURACY), "min_steps": MIN_STEPS,
        "prompt": "problems.loading.build_prompt: DEFAULT_CHAT_TEMPLATE in the chat template (ends with <think>\\n)",
        "chat_template": CHAT_TEMPLATE,
        "data": {"generator": "tribunal.problems.synthetic", "train_problems": len(train), "recipe": RECIPE,
                 "vocab_size": len(tokenizer), "trace_tokens_mean": round(statistics.mean(lengths), 2),
                 "trace_tokens_max": max(lengths)},
        "measured": {"how": "the 500 problems of problems/test.jsonl, one sample each at temperature 1 (float16 "
                            "weights run in float32), graded with thinking=True, chunked by "
                            "tribunal.chunks.intermediate_answers against the gold", **figures},
    }, indent=2, ensure_ascii=False) + "\n")
    print(f"saved to {out}: {step} steps, held-out sampled accuracy {accuracy:.2f}")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

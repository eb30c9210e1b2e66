"""Train the embedded default model: a tiny Llama that solves synthetic word problems about half the time.

    python -m tribunal.embedded.train [--out tribunal/embedded] [--seed 0]

Seeded and CPU-only (a few minutes on 2 cores). It writes, next to this file:
  model/     the model and its tokenizer in Hugging Face format (float16 safetensors, a few MB),
             loaded by `tribunal generate` through the same from_pretrained path as any model;
  problems/  test.jsonl, the default dataset (question / answer with `#### N`).
Training stops at the first evaluation where sampled accuracy at temperature 1.0 reaches
TARGET_ACCURACY, so the model's traces are a real mix of right and wrong.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..grading import grade
from ..problems.synthetic import make_problems

HERE = Path(__file__).resolve().parent
PROMPT = "Question: {question}\nAnswer:"
TARGET_ACCURACY = 0.5


def build_tokenizer(texts) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="left", model_max_length=256)


def encode(tokenizer, problem):
    prompt = tokenizer(PROMPT.format(question=problem["question"]))["input_ids"]
    answer = tokenizer(" " + problem["trace"])["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


@torch.no_grad()
def sampled_accuracy(model, tokenizer, problems, seed: int) -> float:
    model.eval()
    torch.manual_seed(seed)
    right = 0
    for i in range(0, len(problems), 50):
        chunk = problems[i : i + 50]
        batch = tokenizer([PROMPT.format(question=p["question"]) for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=64,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        right += sum(grade(t, p["gold"]) == "correct" for t, p in zip(texts, chunk))
    model.train()
    return right / len(problems)


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
    out = Path(args.out)

    train = make_problems(20000, seed=args.seed * 1000 + 1)
    held_out = make_problems(200, seed=args.seed * 1000 + 2)
    test = make_problems(500, seed=args.seed * 1000 + 3)
    tokenizer = build_tokenizer(PROMPT.format(question=p["question"]) + " " + p["trace"] for p in train)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
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
        if step % args.eval_every == 0:
            accuracy = sampled_accuracy(model, tokenizer, held_out, seed=args.seed)
            print(f"step {step}: loss {loss.item():.3f}, sampled accuracy {accuracy:.2f} ({time.time() - started:.0f}s)",
                  flush=True)
            if accuracy >= TARGET_ACCURACY:
                break
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.float16).save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    (out / "problems").mkdir(parents=True, exist_ok=True)
    with open(out / "problems" / "test.jsonl", "w") as fh:
        for p in test:
            fh.write(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n")
    (out / "model" / "TRAINING.json").write_text(json.dumps(
        {"seed": args.seed, "steps": step, "held_out_sampled_accuracy": accuracy, "prompt": PROMPT,
         "script": "python -m tribunal.embedded.train"}, indent=2))
    print(f"saved to {out}: {step} steps, held-out sampled accuracy {accuracy:.2f}")


if __name__ == "__main__":
    main()

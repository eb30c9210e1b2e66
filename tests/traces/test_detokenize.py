"""IncrementalText (tribunal/traces/detokenize.py): a trace's text token by token, equal to the decode the store
holds wherever no character is incomplete, with the byte-level tokenizer of the embedded model (characters
split across tokens) and a SentencePiece-style one with byte fallback (the window decode)."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tribunal.chunks import token_ends
from tribunal.traces.detokenize import IncrementalText
from tribunal.traces.models import EMBEDDED_MODEL

ALPHABET = list("abc xyz.,\n") + ["é", "😀", "中文", "ß", "\u0301", "wait", " the ", "  ", "<s>", "\ufffd", "=42"]


@pytest.fixture(scope="module")
def embedded():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def byte_fallback():
    """Llama 2's scheme: metaspace, bytes for characters outside the vocabulary, the first space stripped."""
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tk.train_from_iterator(["so the answer is five. wait, let me check the sum again."] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                               initial_alphabet=list("abcdefghijklmnopqrstuvwxyz\u2581.,")))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def sequences(tok, n=150, seed=0):
    """Token ids of random texts, some ending with end-of-sequence, some cut inside a character."""
    rng = random.Random(seed)
    for _ in range(n):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = ids[: rng.randint(1, len(ids))] if rng.random() < 0.3 else ids
        yield ids + [tok.eos_token_id] if rng.random() < 0.3 else ids


def decode(tok, ids):
    return tok.decode([i for i in ids if i != tok.eos_token_id], skip_special_tokens=False)


@pytest.mark.parametrize("name", ["embedded", "byte_fallback"])
def test_deltas_join_to_the_decode_and_tokens_of_characters_match_token_ends(name, request):
    tok = request.getfixturevalue(name)
    split = 0
    for ids in sequences(tok):
        text = IncrementalText(tok, {tok.eos_token_id})
        for k, token_id in enumerate(ids):
            delta = text.push(token_id)
            so_far = decode(tok, ids[: k + 1])
            if so_far.endswith("\ufffd"):  # a character is incomplete (or the text holds U+FFFD): held back
                split += 1
            else:
                assert text.text == so_far, (ids, k)
            assert delta == "" or so_far.startswith(text.text)
        text.finish()
        whole = decode(tok, ids)
        if not (name == "byte_fallback" and whole.endswith("\ufffd")):  # see IncrementalText.finish
            assert text.text == whole, ids
        ends = list(range(1, len(whole) + 1))
        pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
        if "\ufffd" in whole and "".join(pieces).startswith(whole):
            continue  # replacement characters that the pieces spell by accident: token_ends adds up piece lengths
        expected = token_ends(pieces, whole, ends,
                              decode_prefix=lambda n, ids=ids: tok.decode(ids[:n], skip_special_tokens=False))
        assert [text.token_of_char(e) for e in ends] == expected, ids
        assert len(text) == len(ids)
    assert split > 20  # characters split across tokens were seen


def test_a_character_split_across_tokens_arrives_whole(embedded):
    ids = embedded("5 \u00e9 \U0001F600.", add_special_tokens=False)["input_ids"]
    text = IncrementalText(embedded, {embedded.eos_token_id})
    deltas = [text.push(i) for i in ids]
    assert len(ids) > len("5 \u00e9 \U0001F600.")  # the tokenizer splits both characters into bytes
    assert [d for d in deltas if d] == ["5", " ", "\u00e9", " ", "\U0001F600", "."]
    assert text.token_of_char(3) == deltas.index("\u00e9") - 1  # token_ends: the first token whose prefix has 3 chars
    assert text.push(embedded.eos_token_id) == "" and text.finish() == "" and text.text == "5 \u00e9 \U0001F600."


def test_a_trace_cut_inside_a_character_ends_with_what_decode_gives(embedded):
    ids = embedded("ok \U0001F600", add_special_tokens=False)["input_ids"][:-1]
    text = IncrementalText(embedded, set())
    assert "".join(text.push(i) for i in ids) == "ok "
    assert text.finish() == "\ufffd" and text.text == embedded.decode(ids)


def test_the_byte_level_shortcut_gives_what_the_window_decode_gives(embedded):
    """Byte-level tokens are looked up, not decoded; forcing the window decode changes no delta."""
    for ids in sequences(embedded, n=60, seed=1):
        fast, slow = (IncrementalText(embedded, {embedded.eos_token_id}) for _ in range(2))
        slow._pieces = None
        assert fast._pieces is not None
        assert [fast.push(i) for i in ids] == [slow.push(i) for i in ids]
        assert fast.finish() == slow.finish() and fast._lengths == slow._lengths

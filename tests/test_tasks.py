"""Contrast-pair tasks: equal-length pairs, single-token answers, the IOI generator, JSONL pairs, solve rates."""

import json

import pytest
import torch

from saelab.errors import DataError
from saelab.eval import tasks


def _word_tokenizer(words):
    """A word-level fast tokenizer: every listed word (and punctuation mark) is one token, whitespace splits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<bos>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="[UNK]")


def test_ioi_generator_equal_length_single_token_answers():
    names = tasks.read_word_list("ioi_names")[:12]
    vocab = set(names) | set(tasks.read_word_list("ioi_places")) | set(tasks.read_word_list("ioi_objects"))
    for tpl in tasks.IOI_TEMPLATES:
        vocab |= set(tpl.replace(",", " ,").replace(".", " .").split())
    vocab |= {",", "."}
    # the word-level tokenizer splits on whitespace only, so "store," would be unknown: keep commas apart
    tok = _word_tokenizer(sorted(vocab))
    pairs = tasks.ioi_task(tok, n=24, seed=3)
    assert len(pairs) == 24
    lengths = set()
    for c, r, a, w in zip(pairs.clean, pairs.corrupted, pairs.answer, pairs.wrong):
        lengths.add(len(tok.encode(c, add_special_tokens=False)))
        assert len(tok.encode(c, add_special_tokens=False)) == len(tok.encode(r, add_special_tokens=False))
        assert len(tok.encode(a, add_special_tokens=False)) == 1 and len(tok.encode(w, add_special_tokens=False)) == 1
        A, B = a.strip(), w.strip()
        assert A != B and A in names and B in names
        # clean: the subject (second mention) is B, so the indirect object A is the answer; corrupted swaps S2 to A
        assert c.split()[:2] == r.split()[:2]
        assert c.count(B) == 2 and c.count(A) == 1 and r.count(A) == 2 and r.count(B) == 1
    assert len(lengths) == 1


def test_ioi_refuses_tokenizer_without_single_token_names(reference_tokenizer):
    with pytest.raises(DataError, match="single tokens"):
        tasks.ioi_task(reference_tokenizer, n=4)


@pytest.mark.parametrize("name", ["bracket", "copy", "quote"])
def test_reference_tasks_are_solved(reference_model, name):
    batch = tasks.make_task(reference_model, name, n=16, seed=1)
    assert batch.clean.shape == batch.corrupted.shape and batch.clean.shape[0] == 16
    assert (batch.answer != batch.wrong).all()
    assert (batch.clean != batch.corrupted).any(1).all()
    rate = tasks.solve_rate(reference_model, batch)
    assert rate["both_accuracy"] >= 0.8, rate
    assert rate["logit_diff_clean"] > 0 > rate["logit_diff_corrupted"]


def test_logit_diff_hand_case():
    logits = torch.zeros(2, 3, 5)
    logits[0, -1, 1], logits[0, -1, 2] = 3.0, 1.0
    logits[1, -1, 4], logits[1, -1, 0] = -2.0, 0.5
    ld = tasks.logit_diff(logits, torch.tensor([1, 4]), torch.tensor([2, 0]))
    assert ld.tolist() == [2.0, -2.5]
    stacked = tasks.logit_diff(torch.cat([logits, logits]), torch.tensor([1, 4]), torch.tensor([2, 0]))
    assert stacked.tolist() == [2.0, -2.5, 2.0, -2.5]


def _write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_jsonl_pairs_checked(reference_model, tmp_path):
    ok = {"clean": "    x = foo(bar", "corrupted": "    x = foo[bar", "answer": ")", "wrong": "]"}
    batch = tasks.make_task(reference_model, str(_write(tmp_path, [ok, ok])))
    assert batch.n_pairs == 2 and batch.answer.tolist() == [tasks.single_token(reference_model.tokenizer, ")")] * 2
    uneven = dict(ok, corrupted="    x = foo[bar, baz")
    with pytest.raises(DataError, match="pair 1: clean prompt is"):
        tasks.make_task(reference_model, str(_write(tmp_path, [ok, uneven])))
    multi = dict(ok, answer=" alpha")
    with pytest.raises(DataError, match="is 2 tokens"):
        tasks.make_task(reference_model, str(_write(tmp_path, [multi])))
    longer = dict(ok, clean="    x = foo(bar, baz", corrupted="    x = foo[bar, baz")
    with pytest.raises(DataError, match="same token length"):
        tasks.make_task(reference_model, str(_write(tmp_path, [ok, longer])))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="not JSON"):
        tasks.load_pairs_jsonl(tmp_path / "bad.jsonl")

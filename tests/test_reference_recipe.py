"""The reference model's recipe (`saelab reference train`) at toy scale: it runs end to end, a killed run resumes
to exactly the weights of an uninterrupted one, and a checkpoint of another recipe is refused."""

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saelab.data.corpus import CorpusSpec
from saelab.models.train_reference import ReferenceRecipe, _batch, _lr_at, train_reference


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A few stdlib packages as a local corpus: ~300k tokens, with a non-empty validation split."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sys.modules["json"].__file__).parent.parent
    for pkg in ("json", "email", "asyncio"):
        for f in (stdlib / pkg).glob("*.py"):
            shutil.copy(f, root / f"{pkg}_{f.name}")
    return CorpusSpec(str(root))


def tiny(out, **kw):
    return ReferenceRecipe(out=str(out), vocab_size=384, n_layer=2, n_embd=32, n_head=2, n_ctx=32, batch_rows=4,
                           steps=12, warmup_steps=2, checkpoint_every=4, precision="float32", compile=False, repeat_frac=0.25,
                           save_dtype="float32", bracket_sites=50, eval_rows=64, **kw)


class Killed(Exception):
    pass


def test_lr_schedule():
    r = ReferenceRecipe(out="", steps=100, warmup_steps=10, lr=1.0)
    assert _lr_at(0, r) == pytest.approx(0.1) and _lr_at(9, r) == pytest.approx(1.0)
    assert _lr_at(55, r) == pytest.approx(0.5) and _lr_at(99, r) == pytest.approx(1 / 90)
    c = replace(r, decay="cosine", min_lr_ratio=0.1)
    assert _lr_at(10, c) == pytest.approx(1.0) and _lr_at(100, c) == pytest.approx(0.1)


def test_batch_rows_repeat_their_opening_span():
    data = np.arange(10_000, dtype=np.int32)  # consecutive ids, so every restart of the text is visible
    r = ReferenceRecipe(out="", n_ctx=64, batch_rows=200, repeat_frac=0.25)
    rows = _batch(data, r, step=7, bos=-1).numpy()
    assert rows.shape == (200, 64) and (rows[:, 0] == -1).all()
    n_repeating = 0
    for row in rows[:, 1:]:
        jumps = np.flatnonzero(np.diff(row) != 1)
        if len(jumps) == 0:
            continue  # a plain window
        n_repeating += 1
        (j,) = jumps  # one restart, after h tokens: the row is row[:h], row[:h] again, then its continuation
        h = j + 1
        assert 8 <= h <= 31
        np.testing.assert_array_equal(row[h:2 * h], row[:h])
        np.testing.assert_array_equal(row[h:], np.arange(row[0], row[0] + 63 - h))
    assert 30 <= n_repeating <= 70  # 25 % of 200
    np.testing.assert_array_equal(rows, _batch(data, r, step=7, bos=-1).numpy())  # seeded by (seed, step)
    assert not np.array_equal(rows, _batch(data, r, step=8, bos=-1).numpy())
    plain = _batch(data, ReferenceRecipe(out="", n_ctx=64, batch_rows=200, repeat_frac=0.0), step=7, bos=-1)
    assert (np.diff(plain[:, 1:].numpy(), axis=1) == 1).all()


def test_batch_rows_open_with_a_repeated_random_sequence():
    data = np.arange(1000, 11_000, dtype=np.int32)  # ids >= 1000, so the random ones (< 1000) stand out
    r = ReferenceRecipe(out="", n_ctx=64, batch_rows=400, repeat_frac=0.25, random_repeat_frac=0.25)
    rows = _batch(data, r, step=3, bos=5, vocab_size=1000).numpy()[:, 1:]
    natural = _batch(data, replace(r, random_repeat_frac=0.0), step=3, bos=5, vocab_size=1000).numpy()[:, 1:]
    synthetic = rows[:, 0] < 1000
    assert 60 <= synthetic.sum() <= 140  # 25 % of 400
    np.testing.assert_array_equal(rows[~synthetic], natural[~synthetic])  # the other rows are untouched
    for row, nat in zip(rows[synthetic], natural[synthetic]):
        h = int(np.argmax(row >= 1000)) // 2  # the random part is 2h tokens: h and their repeat
        assert 8 <= h <= 31 and (row[:2 * h] < 1000).all() and (row[:2 * h] != 5).all()
        np.testing.assert_array_equal(row[:h], row[h:2 * h])
        np.testing.assert_array_equal(row[2 * h:], nat[:63 - 2 * h])  # then the row's natural text


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_corpus, tmp_path):
    whole = train_reference(tiny(tmp_path / "whole"), tiny_corpus, log=lambda *_: None)

    def kill_at_step_8(msg):  # logged right before the step-8 checkpoint would be written
        if msg.startswith("step 8:"):
            raise Killed

    with pytest.raises(Killed):
        train_reference(tiny(tmp_path / "resumed"), tiny_corpus, log=kill_at_step_8)
    partial = tmp_path / "resumed" / "partial"
    assert json.loads((partial / "step.json").read_text())["step"] == 4
    logged = []
    again = train_reference(tiny(tmp_path / "resumed"), tiny_corpus, log=logged.append)
    assert any("resuming from the checkpoint at step 4" in m for m in logged)
    assert not partial.exists()  # cleaned up once the model is saved

    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert again["validation"]["bits_per_byte"] == whole["validation"]["bits_per_byte"]

    # what a user gets: a model directory with its card and numbers, loadable by transformers
    out = tmp_path / "whole"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md", "quality.json"):
        assert (out / name).is_file(), name
    assert whole["n_params"] > 0 and 0 < whole["validation"]["bits_per_byte"] < 8
    assert {"first_copy_loss", "second_copy_loss"} <= whole["induction"].keys()
    assert f"{whole['validation']['bits_per_byte']:.4f}" in (out / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_checkpoint_of_another_recipe_is_refused(tiny_corpus, tmp_path):
    def kill_at_step_8(msg):
        if msg.startswith("step 8:"):
            raise Killed

    with pytest.raises(Killed):
        train_reference(tiny(tmp_path), tiny_corpus, log=kill_at_step_8)
    with pytest.raises(ValueError, match=r"different recipe \(it differs in lr\).*delete"):
        train_reference(replace(tiny(tmp_path), lr=1e-3), tiny_corpus, log=lambda *_: None)

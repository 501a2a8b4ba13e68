"""Token-level user tasks for sparse probing: character spans → per-token labels, and probing them end to end."""

import json

import numpy as np
import pytest
import torch

from saelab.data.labels import span_labels
from saelab.eval.probing import gather_span_data, load_spans

HOOK = "blocks.2.hook_resid_pre"  # the reference model's middle residual stream


def test_spans_align_to_tokens_by_the_first_non_blank_character(reference_tokenizer):
    text = "x = foo(1)"  # tokens: 'x' (0,1)  ' =' (1,3)  ' foo' (3,7)  '(' (7,8)  '1' (8,9)  ')' (9,10)
    spans = {"call": [(4, 10)], "number": [(8, 9)], "eq": [(2, 3)], "blank": [(1, 2), (3, 4)], "none": []}
    lt = span_labels(text, spans, ["call", "number", "eq", "blank", "none", "absent"], reference_tokenizer)
    assert [reference_tokenizer.decode([i]) for i in lt.ids] == ["x", " =", " foo", "(", "1", ")"]
    assert lt.labels.T.tolist() == [
        [0, 0, 1, 1, 1, 1],  # call: ' foo' starts (after its blank) inside [4, 10)
        [0, 0, 0, 0, 1, 0],  # number
        [0, 1, 0, 0, 0, 0],  # eq: ' =' takes its '=' (char 2), not its blank
        [0, 0, 0, 0, 0, 0],  # blank: spans over blanks only reach no token's first non-blank character
        [0, 0, 0, 0, 0, 0],  # none: the key with an empty list, all negative
        [-1] * 6,  # absent: a task this row lacks is unlabelled
    ]
    special = span_labels("a<|endoftext|>b", {"t": [(0, 15)]}, ["t"], reference_tokenizer)
    assert special.labels[:, 0].tolist() == [1, -1, 1]  # a literal special token is no example


def _inside_parens(text: str) -> list[list[int]]:
    spans, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
            start = i + 1 if depth == 1 else start
        elif c == ")":
            depth -= 1
            if depth == 0 and i > start:
                spans.append([start, i])
    return spans


def _code_lines(n: int, seed: int = 0) -> list[dict]:
    """Small functions: `def` (the token itself) and `in_parens` (inside round brackets), as JSONL rows; every
    7th row lacks the def task (unlabelled), one row has it with no span (all negative)."""
    g = np.random.default_rng(seed)
    names = ["alpha", "beta", "count", "total", "value", "item", "node", "path", "size", "key"]
    rows = []
    for i in range(n):
        f, a, b, c = g.choice(names, 4, replace=False)
        text = (f"def {f}({a}, {b}):\n    {c} = {a} * {int(g.integers(100))}\n    return max({c}, {b}) + {a}\n"
                if i % 5 else f"{c} = {f}({a}, {b})\nprint({c}, {a})\n")
        spans = {"def": [[m, m + 3] for m in range(len(text)) if text.startswith("def ", m)],
                 "in_parens": _inside_parens(text)}
        if i % 7 == 3:
            del spans["def"]
        rows.append({"text": text, "spans": spans})
    return rows


@pytest.fixture(scope="module")
def span_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spans") / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _code_lines(60)))
    return path


def _random_sae(d: int):
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=512, k=32, hook_name=HOOK, model_name="reference"))
    sae.reset_parameters(seed=0)
    return sae


def test_span_data_has_one_example_per_token_and_splits_by_row(span_file, reference_model):
    rows, tasks = load_spans(str(span_file))
    assert tasks == ["def", "in_parens"] and len(rows) == 60
    rows = rows[:12]  # a dozen texts: the forward passes are what costs here
    data = gather_span_data(reference_model, HOOK, rows, tasks, context_size=16)  # most texts span two rows
    n_tokens = [len(reference_model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t, _ in rows]
    assert data.x.shape == (sum(n_tokens), reference_model.cfg.d_model) and data.kind == "token"
    bounds = np.cumsum([0] + n_tokens)
    per_row = [set(data.is_test[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
    assert max(n_tokens) > 15 and all(len(s) == 1 for s in per_row)  # no text on both sides of the split
    assert 0 < data.is_test.sum() < len(data.is_test)
    assert set(data.labels["def"][bounds[3]:bounds[4]].tolist()) == {-1}  # row 3 lacks the def task
    assert data.labels["def"][bounds[1]] == 1 and data.labels["def"][bounds[0]:bounds[1]].max() == 0


def test_token_level_probing_end_to_end(span_file, reference_model, tmp_path):
    from saelab.config import TrainConfig
    from saelab.eval.run import probe_run
    from saelab.rundir import RunDir

    sae = _random_sae(reference_model.cfg.d_model)
    loaded = (sae, reference_model, TrainConfig(context_size=32), RunDir(tmp_path))  # short rows: fast forwards
    result, path = probe_run(tmp_path, data=str(span_file), level="token", progress=False, loaded=loaded)
    saved = json.loads(path.read_text())
    assert saved["level"] == result.level == "token" and set(saved["tasks"]) == {"def", "in_parens"}
    for task in ("def", "in_parens"):
        t = result.tasks[task]
        assert t["dense"]["accuracy"] > 0.8, (task, t["dense"])
        best20 = max(t["k"]["20"]["sae"]["accuracy"], t["k"]["20"]["neurons"]["accuracy"])
        assert best20 > 0.7, (task, t["k"]["20"])


def test_sequence_level_density_counts_every_token_of_the_train_texts(reference_model):
    """Pooled data keeps each latent's per-token density over the probe-train texts: a brute-force count, one
    text at a time, agrees."""
    from saelab.data.packing import special_ids
    from saelab.eval.probing import gather_sequence_data
    from saelab.eval.splice import capture

    texts = [f"value_{i} = compute({i}, 'x' * {i})" if i % 3 else f"# note {i}: nothing here" for i in range(24)]
    rows = [(t, "code" if i % 3 else "comment") for i, t in enumerate(texts)]
    sae = _random_sae(reference_model.cfg.d_model)
    data = gather_sequence_data(reference_model, sae, HOOK, rows, context_size=16, batch_rows=5)
    bos, _ = special_ids(reference_model.tokenizer)
    fired, n = np.zeros(sae.cfg.n_latents), 0
    for (text, _), test in zip(rows, data.is_test):
        if test:
            continue
        ids = [bos] + reference_model.tokenizer(text, add_special_tokens=False)["input_ids"][:15]
        _, acts = capture(reference_model, torch.tensor([ids]), HOOK)
        z = sae.encode(acts[HOOK].reshape(len(ids), -1)[1:]).to_dense(sae.cfg.n_latents)  # BOS is not a token
        fired += (z != 0).sum(0).numpy()
        n += len(ids) - 1
    assert 0 < data.is_test.sum() < len(rows) and data.density_tokens == n
    assert data.density == pytest.approx(fired / n, abs=1e-12)

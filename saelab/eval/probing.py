"""k-sparse probing: how well do k SAE latents, chosen per task, predict a binary property of the input?

Method (Gurnee et al. 2023 as SAEBench applies it, evals notes §1.3 and §2):
    for each binary task, on a class-balanced TRAIN set:
        rank features by one of SELECTIONS (below), keep the top k
        for k in KS = (1, 2, 5, 10, 20): fit an L2 logistic regression (scikit-learn, C=1) on the top-k features
    report on a class-balanced TEST set (other files than train): accuracy, F1 and AUROC. (Test sets are balanced,
    so accuracy is balanced accuracy.)
Selections (how the k features are ranked, best first; train examples only):
    mean_diff    |mean_pos − mean_neg|: Gurnee's default heuristic, SAEBench's sparse probing. Scale-dependent: a
                 dense latent with large values can top it while separating the classes worse than chance.
    f_stat       the ANOVA F-statistic (Gurnee's f_stat). On balanced classes it is a monotone function of
                 |mean_pos − mean_neg| / std, the mean difference of standardised features (Gurnee's scaling before
                 mean_dif): the std-normalised mean difference, so it is not listed twice.
    probe_loss   the training loss of a 1-D probe on the feature alone (the same L2 logistic regression, C=1, on
                 the standardised feature), lowest first: Gao et al. 2024 ("Scaling and evaluating sparse
                 autoencoders", the "probe loss" metric) score each task by the best such single-latent probe. Scale-free,
                 and a latent that fires on most tokens ranks by how well it separates the classes, not by its size.
    max_density  (with any selection) SAE latents active on more than this share of the probe-train tokens are left
                 out of the ranking.
Each selected SAE latent is reported with its density (share of the probe-train tokens it is active on, value != 0)
and flagged dense above DENSE_DENSITY, so a k = 1 result carried by one dense latent shows as such.
The same k-sparse probe runs in the same pass on three other bases of the same activations:
    neurons   the raw activation dimensions of the hook
    rotation  the activations in a random orthonormal basis (x @ Q, Q from the QR of a seeded Gaussian matrix):
              if the SAE beats this, it is the SAE's basis and not sparsity alone that helps
    dense     all activation dimensions (no selection): the ceiling
Features are standardised with the train set's mean and std before every fit (a monotone per-feature map: it
does not change which features are chosen, only helps the solver converge).

Data. Reference tasks (`saelab.data.labels.TASKS`): per-token labels of Python source from the corpus split the
SAE did NOT train on ("validation"), files split into probe-train / probe-test by a hash of their path. User
tasks (`--data FILE`), at one of two levels (`--level`):
    sequence  (text, label) rows from a JSONL/CSV file or an HF dataset, pooled per sequence by the mean over
              non-special tokens (SAE latents: encode each token, then pool, as SAEBench does) or the last token;
              a multi-class label gives one one-vs-rest task per class
    token     a JSONL file (or an HF dataset) whose rows hold the text and, per task, the character spans that are
              positive:  {"text": "x = foo(1)", "spans": {"call": [[4, 10]], "number": [[8, 9]]}}
              Spans are [start, end) character offsets (0 <= start < end <= len(text), integers); the task names
              are the keys; a row lacking a task's key is unlabelled for it (−1), a key with an empty list makes
              every token of the row negative. One example per non-special BPE token, labelled by
              `saelab.data.labels.span_labels` (the code tasks' alignment rule: a token is inside a span when its
              first non-whitespace character is).
    Both levels split train / test by row (a hash of its index and text): a text is never on both sides.
Activations are gathered once and reused by every task.
g-SAEs (`splice.infers_with_grad`) select latents with the LM-loss gradient at the hook: their activations are
gathered with that gradient (one backward per batch; the activation cache's loss, over the real tokens' targets
only), the "sae" basis encodes with it, and its TopK fallback (encode without the gradient) is probed beside it as
the basis "sae_topk_fallback".
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from saelab.errors import ConfigError, DataError
from saelab.eval.splice import (FALLBACK_RULE, GRAD_RULE, capture, default_special_ids, infers_with_grad,
                                lm_loss_grad, special_mask)
from saelab.models.loading import model_device
from saelab.settings import parse_ints, setting

KS = (1, 2, 5, 10, 20)
LEVELS = ("sequence", "token")  # of a user's labelled data
SELECTIONS = ("mean_diff", "f_stat", "probe_loss")
BASES = ("sae", "neurons", "rotation")
FALLBACK_BASIS = "sae_topk_fallback"  # a g-SAE's latents without the gradient, probed beside its own
DENSE_DENSITY = 0.1  # a selected latent active on more than this share of tokens is flagged dense (as `eval`)


# ================================================================================================ data
@dataclass
class ProbeData:
    """Activations gathered once for all tasks.

    x [N, d] float32: the hook activation of each example (a token, or a pooled sequence).
    z [N, n_latents] (optional, torch sparse-free dense only for pooled data) or None: pooled SAE latents; for
        token data the SAE is applied lazily to the rows a task uses (see `sae_features`).
    labels {task: int8 [N]}: 1 / 0, or −1 where the example has no label for that task.
    is_test [N] bool: held-out examples (whole files or sequences).
    density [n_latents] or None: share of the probe-train tokens each SAE latent is active on, with the number of
        those tokens in `density_tokens` (pooled data fills it while encoding; for token data `probe_tasks`
        counts it from x).
    """

    x: torch.Tensor
    labels: dict[str, np.ndarray]
    is_test: np.ndarray
    z: torch.Tensor | None = None
    kind: str = "token"
    density: np.ndarray | None = None
    density_tokens: int = 0
    grad: torch.Tensor | None = None  # [N, d] the LM-loss gradient at each token (a g-SAE's token data)
    z_fallback: torch.Tensor | None = None  # pooled latents of a g-SAE's TopK fallback (sequence data)


def _is_test_key(key: str, test_frac: float) -> bool:
    h = int.from_bytes(hashlib.sha256(("probe:" + key).encode()).digest()[:8], "big")
    return h % 10_000 < test_frac * 10_000


def _rows_of(ids: np.ndarray, context_size: int, bos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """[BOS] + chunks of context_size − 1 ids, the last padded with `pad`; and which positions hold ids."""
    body = context_size - 1
    n = max(1, math.ceil(len(ids) / body))
    rows = np.full((n, context_size), pad, dtype=np.int64)
    real = np.zeros((n, context_size), dtype=bool)
    rows[:, 0] = bos
    for r in range(n):
        chunk = ids[r * body:(r + 1) * body]
        rows[r, 1:1 + len(chunk)] = chunk
        real[r, 1:1 + len(chunk)] = True
    return rows, real


@torch.no_grad()
def hook_rows(model, hook: str, rows: np.ndarray, keep: np.ndarray, batch_rows: int = 32,
              progress: bool = False, with_grad: bool = False):
    """Activations [n, d] at the True positions of keep [R, L] of token rows [R, L] (truncated forwards); with_grad:
    (activations, LM-loss gradients [n, d]), the loss over the targets at kept positions (full forwards)."""
    dev = model_device(model)
    out, grads = [], []
    it = range(0, len(rows), batch_rows)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="activations", unit="batch")
    for i in it:
        tok = torch.as_tensor(rows[i:i + batch_rows], device=dev)
        k = torch.as_tensor(keep[i:i + batch_rows], device=dev)
        if with_grad:
            _, a, g = lm_loss_grad(model, tok, hook, target_mask=k)
            grads.append(g.reshape(*tok.shape, -1)[k].float().cpu())
        else:
            _, acts = capture(model, tok, hook)
            a = acts[hook]
        out.append(a.reshape(*tok.shape, -1)[k].float().cpu())
    return (torch.cat(out), torch.cat(grads)) if with_grad else torch.cat(out)


def gather_token_data(model, hook: str, texts, context_size: int = 128, test_frac: float = 0.3,
                      batch_rows: int = 32, progress: bool = False, tasks: Sequence[str] | None = None,
                      whole_texts: bool = False, with_grad: bool = False) -> ProbeData:
    """Token-level data from `LabelledText`s (saelab.data.labels) whose label columns are `tasks` (default: the
    code tasks, `TASKS`): one example per BPE token, texts split into train/test by a hash of their key. With too
    few texts for that, the last test_frac of each text is test, or with `whole_texts` the last texts are."""
    from saelab.data.labels import TASKS
    from saelab.data.packing import special_ids

    if not texts:
        raise DataError("no labelled texts to probe on", hint="check the corpus split")
    bos, eos = special_ids(model.tokenizer)
    all_rows, all_real, lab, test = [], [], [], []
    for t in texts:
        rows, real = _rows_of(t.ids, context_size, bos, eos)
        all_rows.append(rows)
        all_real.append(real)
        lab.append(t.labels)
        test.append(np.full(len(t.ids), _is_test_key(t.key, test_frac)))
    test_arr = np.concatenate(test)
    if test_arr.all() or not test_arr.any():  # too few texts for a split by hash
        test_arr = _split_by_position(texts, test_frac, whole_texts)
    x = hook_rows(model, hook, np.concatenate(all_rows), np.concatenate(all_real), batch_rows, progress, with_grad)
    x, grad = x if with_grad else (x, None)  # with_grad: a g-SAE's data, with the gradient at each token
    y = np.concatenate(lab)
    return ProbeData(x=x, labels={task: y[:, j].astype(np.int8) for j, task in enumerate(tasks or TASKS)},
                     is_test=test_arr, grad=grad)


def _split_by_position(texts, test_frac: float, whole_texts: bool) -> np.ndarray:
    """Per-token is_test: the last test_frac of each text's tokens, or (whole_texts) of the texts, at least one."""
    if not whole_texts:
        return np.concatenate([np.arange(len(t.ids)) >= (1 - test_frac) * len(t.ids) for t in texts])
    n_test = min(len(texts) - 1, max(1, round(test_frac * len(texts))))
    return np.concatenate([np.full(len(t.ids), i >= len(texts) - n_test) for i, t in enumerate(texts)])


def reference_data(model, hook: str, corpus=None, max_tokens: int = 80_000, context_size: int = 128,
                   test_frac: float = 0.3, progress: bool = False, with_grad: bool = False) -> ProbeData:
    """The reference code tasks on the corpus's validation split (held out from SAE training)."""
    from saelab.data.corpus import CorpusSpec
    from saelab.data.labels import label_corpus

    texts = label_corpus(corpus if corpus is not None else CorpusSpec(), model.tokenizer, "validation", max_tokens)
    return gather_token_data(model, hook, texts, context_size, test_frac, progress=progress, with_grad=with_grad)


def read_rows(source: str, split: str = "train", max_rows: int | None = 4000,
              formats: tuple[str, ...] = (".jsonl", ".json", ".csv")) -> list[tuple[str, dict]]:
    """(where, row) pairs of a labelled-data file in `formats` (where = "FILE:LINE") or an HF dataset name
    (where = "NAME row I"): the first max_rows rows, each a mapping; a malformed line is one DataError naming it."""
    p = Path(source).expanduser()
    if p.exists():
        if p.suffix not in formats:
            raise DataError(f"{p}: unknown labelled-data format {p.suffix!r}", hint=f"use {' or '.join(formats)}")
        rows = _csv_rows(p) if p.suffix == ".csv" else _json_rows(p)
    else:
        from saelab.hub import hub_reachable

        if not hub_reachable():
            raise DataError(f"labelled data {source!r}: no such file, and the Hugging Face hub is unreachable",
                            hint=f"give a local {'/'.join(formats)} file")
        import datasets

        rows = [(f"{source} row {i}", r) for i, r in
                enumerate(datasets.load_dataset(source, split=split).select(range(max_rows or 10 ** 9)))]
    rows = rows[:max_rows] if max_rows else rows
    for where, r in rows:
        if not isinstance(r, dict):
            raise DataError(f"{where}: not a JSON object (got {type(r).__name__})")
    return rows


def _json_rows(p: Path) -> list[tuple[str, Any]]:
    rows = []
    for i, line in enumerate(p.read_text().splitlines()):
        if line.strip():
            try:
                rows.append((f"{p}:{i + 1}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i + 1}: not JSON ({e.msg})") from None
    return rows


def _csv_rows(p: Path) -> list[tuple[str, dict]]:
    import csv

    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        return [(f"{p}:{reader.line_num}", r) for r in reader]


def load_labelled(source: str, text_field: str = "text", label_field: str = "label", split: str = "train",
                  max_rows: int | None = 4000) -> list[tuple[str, str]]:
    """Sequence-level (text, label) rows from a .jsonl/.json/.csv file or an HF dataset name."""
    out = []
    for where, r in read_rows(source, split, max_rows):
        if text_field not in r or label_field not in r:
            raise DataError(f"{where}: lacks the field {text_field!r} or {label_field!r} (it has {sorted(r)})",
                            hint="set --text-field / --label-field (--level token for span data)")
        out.append((str(r[text_field]), str(r[label_field])))
    if not out:
        raise DataError(f"{source}: no labelled rows")
    return out


SPANS_FORMAT = '{"text": "x = foo(1)", "spans": {"call": [[4, 10]], "number": [[8, 9]]}}'


def load_spans(source: str, text_field: str = "text", spans_field: str = "spans", split: str = "train",
               max_rows: int | None = 4000) -> tuple[list[tuple[str, dict[str, list[tuple[int, int]]]]], list[str]]:
    """Token-level rows (text, {task: [(start, end), ...]}) from a .jsonl file or an HF dataset name (format: the
    module docstring), and the task names in order of first appearance. Checked here, before any model loads."""
    rows, tasks = [], {}
    for where, r in read_rows(source, split, max_rows, formats=(".jsonl", ".json")):
        if not isinstance(r.get(text_field), str):
            raise DataError(f"{where}: no text field {text_field!r} (it has {sorted(r)})", hint="set --text-field")
        if spans_field not in r:
            raise DataError(f"{where}: no spans field {spans_field!r} for --level token (it has {sorted(r)})",
                            hint=f"each line like {SPANS_FORMAT}; set --label-field, or --level sequence")
        spans = _checked_spans(r[spans_field], len(r[text_field]), where)
        rows.append((r[text_field], spans))
        tasks.update(dict.fromkeys(spans))
    if not tasks:
        raise DataError(f"{source}: no task in any {spans_field!r} field", hint=f"each line like {SPANS_FORMAT}")
    if len(rows) < 2:  # train and test are split by row
        raise DataError(f"{source}: token-level probing needs two rows or more, got {len(rows)}")
    return rows, list(tasks)


def _checked_spans(spans: Any, n_chars: int, where: str) -> dict[str, list[tuple[int, int]]]:
    """{task: [(start, end), ...]} with integer bounds, 0 <= start < end <= n_chars; else a DataError naming `where`."""
    if not isinstance(spans, dict):
        raise DataError(f"{where}: spans must map each task to [[start, end], ...], got {type(spans).__name__}",
                        hint=f"each line like {SPANS_FORMAT}")
    out = {}
    for task, pairs in spans.items():
        if not isinstance(pairs, list) or not all(_is_int_pair(p) for p in pairs):
            raise DataError(f"{where}: spans of {task!r} must be a list of [start, end] integer pairs, got "
                            f"{json.dumps(pairs)[:60]}", hint=f"each line like {SPANS_FORMAT}")
        for a, b in pairs:
            if b <= a:
                raise DataError(f"{where}: span [{a}, {b}] of {task!r} is empty: end <= start")
            if a < 0 or b > n_chars:
                raise DataError(f"{where}: span [{a}, {b}] of {task!r} is out of range: the text has {n_chars} "
                                f"characters (0 <= start < end <= {n_chars})")
        out[str(task)] = [(a, b) for a, b in pairs]
    return out


def _is_int_pair(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and len(p) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in p)


# ================================================================================================ settings
@dataclass
class ProbingSettings:
    """`saelab eval --suite probing`'s settings (`saelab.evaluate(..., suites=["probing"])`'s keywords), checked
    when built. data: a user's labelled data (read into `labelled`) instead of the reference code tasks."""

    selection: str = setting(SELECTIONS[0], "probing: how the k features are ranked on the probe-train examples: "
                             "mean_diff (|mean_pos - mean_neg|, SAEBench), f_stat (ANOVA F: the std-normalised mean "
                             "difference), probe_loss (the loss of a 1-D probe on each feature alone, Gao et al. 2024)",
                             choices=SELECTIONS)
    max_density: float | None = setting(None, "probing: leave out of the selection SAE latents active on more than "
                                        f"this share of the probe-train tokens, e.g. {DENSE_DENSITY:g}",
                                        default_text="none left out", parse=float)
    ks: Sequence[int] = setting(KS, "probing: comma-separated probe sizes k", default_text=",".join(map(str, KS)),
                                parse=parse_ints)
    data: str | None = setting(None, "probing: your labelled data instead of the code tasks: a .jsonl/.csv file or "
                               "an HF dataset with a text and a label column (--level sequence), or a .jsonl file "
                               "with the text and positive character spans per task (--level token), each line like "
                               f"{SPANS_FORMAT}", default_text="the code tasks")
    level: str = setting(LEVELS[0], "probing --data: sequence: one example per text, label per text; token: one "
                         "example per BPE token, positive inside a task's [start, end) character spans (a line "
                         "without a task's key is unlabelled for it)", choices=LEVELS)
    text_field: str = setting("text", "probing --data: the text column")
    label_field: str | None = setting(None, "probing --data: the label column, or at --level token the spans column",
                                      default_text="label; spans")
    pooling: str = setting("mean", "probing --data at --level sequence: pool token activations by their mean or "
                           "take the last token", choices=("mean", "last"))

    def __post_init__(self):
        from saelab.settings import check

        check(self.level in LEVELS, "--level", f"{self.level!r}; use {' or '.join(LEVELS)}")
        check(self.selection in SELECTIONS, "--selection", f"{self.selection!r}; use {', '.join(SELECTIONS)}")
        check(self.max_density is None or 0 < self.max_density <= 1, "--max-density",
              f"must be in (0, 1], got {self.max_density}")
        self.ks = list(self.ks)
        check(len(self.ks) > 0 and all(isinstance(k, int) and k >= 1 for k in self.ks), "--ks",
              f"must be positive integers, got {self.ks}")

    @cached_property
    def labelled(self):
        """The user's labelled data, read and checked once (touch it before a model loads: a bad line fails at
        once): (rows, tasks) at level "token", rows at level "sequence"; None for the reference tasks."""
        if not self.data:
            return None
        if self.level == "token":
            return load_spans(self.data, self.text_field, self.label_field or "spans")
        return load_labelled(self.data, self.text_field, self.label_field or "label")


def gather_span_data(model, hook: str, rows: Sequence[tuple[str, dict]], tasks: Sequence[str],
                     context_size: int = 128, test_frac: float = 0.3, progress: bool = False,
                     with_grad: bool = False) -> ProbeData:
    """Token-level data from `load_spans`'s rows: one example per non-special BPE token, labelled by the spans;
    train/test split by row (a hash of its index and text, as at sequence level), so no text is on both sides."""
    from saelab.data.labels import span_labels

    texts = [span_labels(text, spans, tasks, model.tokenizer, key=f"{i}:{text}")
             for i, (text, spans) in enumerate(rows)]
    return gather_token_data(model, hook, texts, context_size, test_frac, progress=progress, tasks=tasks,
                             whole_texts=True, with_grad=with_grad)


@torch.no_grad()
def gather_sequence_data(model, sae, hook: str, rows: Sequence[tuple[str, str]], name: str = "user",
                         pooling: str = "mean", context_size: int = 128, test_frac: float = 0.3,
                         batch_rows: int = 16) -> ProbeData:
    """Sequence-level data: each text is truncated to context_size tokens (BOS first) and pooled ("mean" over
    non-special tokens, or "last"); SAE latents are encoded per token and then pooled. Binary labels give one
    task `name`; more classes give one-vs-rest tasks `name:class`."""
    from saelab.data.packing import special_ids

    if pooling not in ("mean", "last"):
        raise ConfigError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    bos, eos = special_ids(model.tokenizer)
    specials = default_special_ids(model)
    dev = model_device(model)
    is_test = np.array([_is_test_key(f"{i}:{t}", test_frac) for i, (t, _) in enumerate(rows)])
    xs, zs, zs_fallback = [], [], []
    with_grad = infers_with_grad(sae)  # a g-SAE: encode with the LM-loss gradient, its TopK fallback beside
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.int64)  # per-token activity over the train sequences
    n_train_tokens = 0
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i:i + batch_rows]
        ids = [[bos] + model.tokenizer(t, add_special_tokens=False)["input_ids"][:context_size - 1] for t, _ in chunk]
        L = max(len(r) for r in ids)
        tok = torch.full((len(ids), L), eos, dtype=torch.long)
        valid = torch.zeros(len(ids), L, dtype=torch.bool)
        for j, r in enumerate(ids):
            tok[j, :len(r)] = torch.as_tensor(r)
            valid[j, :len(r)] = True
        keep = valid & ~special_mask(tok, specials)
        for j, r in enumerate(ids):  # a text of only special tokens: keep its last position
            if not keep[j].any():
                keep[j, len(r) - 1] = True
        if pooling == "last":
            last = keep.long().cumsum(1).argmax(1)
            keep = torch.zeros_like(keep)
            keep[torch.arange(len(ids)), last] = True
        if with_grad:  # the loss over the texts' own targets, not the padding's
            _, act, g = lm_loss_grad(model, tok.to(dev), hook, target_mask=valid)
            g = g.reshape(len(ids), L, -1).float().cpu()[keep]
        else:
            _, acts = capture(model, tok.to(dev), hook)
            act, g = acts[hook], None
        a = act.reshape(len(ids), L, -1).float().cpu()
        w = keep.float() / keep.sum(1, keepdim=True)
        xs.append(torch.einsum("bl,bld->bd", w, a))
        flat = a[keep]
        seq = torch.repeat_interleave(torch.arange(len(ids)), keep.sum(1))

        def pooled(dense):
            return torch.zeros(len(ids), sae.cfg.n_latents).index_add_(0, seq, dense) / keep.sum(1, keepdim=True)

        dense = torch.as_tensor(sae_features(sae, flat, grad=g))
        zs.append(pooled(dense))
        if with_grad:
            zs_fallback.append(pooled(torch.as_tensor(sae_features(sae, flat))))
        train_tok = ~torch.as_tensor(is_test[i:i + batch_rows])[seq]
        fired += (dense[train_tok] != 0).sum(0)
        n_train_tokens += int(train_tok.sum())
    labels = np.array([lab for _, lab in rows])
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise DataError(f"labelled data has a single label {classes}; probing needs two classes or more")
    tasks = {name: (labels == classes[-1]).astype(np.int8)} if len(classes) == 2 else \
        {f"{name}:{c}": (labels == c).astype(np.int8) for c in classes}
    return ProbeData(x=torch.cat(xs), labels=tasks, is_test=is_test, z=torch.cat(zs), kind="sequence",
                     density=(fired.double() / max(n_train_tokens, 1)).numpy(), density_tokens=n_train_tokens,
                     z_fallback=torch.cat(zs_fallback) if with_grad else None)


# ================================================================================================ probing
def balanced_indices(y: np.ndarray, pool: np.ndarray, n_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Equal numbers of positives and negatives (at most n_per_class each) drawn from the indices in `pool`."""
    pos = pool[y[pool] == 1]
    neg = pool[y[pool] == 0]
    n = min(len(pos), len(neg), n_per_class)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


def rank_features(X: np.ndarray, y: np.ndarray, selection: str = "mean_diff",
                  exclude: np.ndarray | None = None) -> np.ndarray:
    """Feature indices, best first (ties: lower index), by `selection` (one of SELECTIONS, module docstring);
    features where `exclude` [n_features] bool is True are left out."""
    if selection == "mean_diff":
        score = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    elif selection == "f_stat":
        from sklearn.feature_selection import f_classif

        import warnings

        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "features are constant": a latent silent on the sample
            score, _ = f_classif(X, y)
        score = np.nan_to_num(score, nan=0.0, posinf=np.finfo(np.float64).max)
    elif selection == "probe_loss":
        score = -probe_losses(X, y)
    else:
        raise ConfigError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    order = np.argsort(-score, kind="stable")
    return order if exclude is None else order[~np.asarray(exclude, dtype=bool)[order]]


def probe_losses(X: np.ndarray, y: np.ndarray, C: float = 1.0, max_steps: int = 100) -> np.ndarray:
    """Mean training log-loss [n_features] of a 1-D probe on each feature alone: the L2 logistic regression of
    `fit_probe` (objective ½w² + C·Σ log-loss, intercept unpenalised, feature standardised), fitted for all
    features at once by Newton steps (a 2×2 solve per feature) with step halving. Sums run over the non-zero
    entries only, the zeros of a column entering through their count per class (they share one standardised
    value), so a sparse SAE code costs its non-zeros, not n × n_features."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, F = X.shape
    mu, sd = X.mean(0), X.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    col, row = np.nonzero(X.T)  # non-zero entries, column by column
    v = (X[row, col] - mu[col]) / sd[col]  # their standardised values
    yv = y[row]
    z0 = -mu / sd  # the standardised value of a raw 0, per column
    n0 = n - np.bincount(col, minlength=F)  # zeros per column, and how many of them are positives
    n0_pos = y.sum() - np.bincount(col, weights=yv, minlength=F)

    def colsum(nz_terms: np.ndarray, zero_terms: np.ndarray) -> np.ndarray:
        return np.bincount(col, weights=nz_terms, minlength=F) + zero_terms

    def losses(w, b):  # Σ log-loss per column
        z, zz = w[col] * v + b[col], w * z0 + b
        return colsum(np.logaddexp(0.0, z) - yv * z, n0 * np.logaddexp(0.0, zz) - n0_pos * zz)

    def logistic(z):
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # without overflow

    p_all = min(max(y.mean(), 1e-12), 1 - 1e-12)
    w, b = np.zeros(F), np.full(F, math.log(p_all / (1 - p_all)))
    f = 0.5 * w * w + C * losses(w, b)
    for _ in range(max_steps):
        p, p0 = logistic(w[col] * v + b[col]), logistic(w * z0 + b)
        r, s, s0 = p - yv, p * (1 - p), p0 * (1 - p0)
        r0 = n0 * p0 - n0_pos  # Σ (p − y) over the zeros
        gw = w + C * colsum(r * v, r0 * z0)
        gb = C * colsum(r, r0)
        hww = 1.0 + C * colsum(s * v * v, n0 * s0 * z0 * z0)
        hwb = C * colsum(s * v, n0 * s0 * z0)
        hbb = C * colsum(s, n0 * s0) + 1e-12
        det = hww * hbb - hwb * hwb
        dw, db = (hbb * gw - hwb * gb) / det, (hww * gb - hwb * gw) / det
        t = np.ones(F)
        for _ in range(40):  # halve the step of each feature whose objective would rise
            f_new = 0.5 * (w - t * dw) ** 2 + C * losses(w - t * dw, b - t * db)
            worse = f_new > f + 1e-12 * np.abs(f)  # (a rise within rounding counts as no rise)
            if not worse.any():
                break
            t = np.where(worse, 0.5 * t, t)
        t = np.where(worse, 0.0, t)  # (no decrease in 40 halvings: that feature is at its optimum)
        w, b, f = w - t * dw, b - t * db, np.where(worse, f, f_new)
        if np.max(np.abs(t * dw) + np.abs(t * db)) < 1e-9:
            break
    return losses(w, b) / n


def fit_probe(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, C: float = 1.0
              ) -> dict[str, float]:
    """L2 logistic regression (scikit-learn, C) on standardised features; test accuracy, F1 and AUROC."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    # Newton steps are exact and fast for the few features of a sparse probe; L-BFGS for the dense one
    solver = "newton-cholesky" if Xtr.shape[1] <= 32 else "lbfgs"
    clf = LogisticRegression(C=C, max_iter=1000, solver=solver)
    clf.fit((Xtr - mu) / sd, ytr)
    return binary_metrics(yte, clf.decision_function((Xte - mu) / sd))


def binary_metrics(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Accuracy and F1 of (score > 0), and AUROC of score (Mann–Whitney U with tied ranks averaged)."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    pred = score > 0
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    auroc = math.nan
    if n_pos and n_neg:
        auroc = (rankdata(score)[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"accuracy": float((pred == y).mean()), "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            "auroc": float(auroc)}


def random_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """A uniformly random d×d orthogonal matrix (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@dataclass
class ProbingResult:
    hook_name: str
    n_latents: int
    selection: str
    ks: list[int]
    tasks: dict[str, Any] = field(default_factory=dict)
    mean: dict[str, Any] = field(default_factory=dict)
    level: str = "token"  # the examples: tokens (the code tasks, span data) or pooled sequences
    max_density: float | None = None  # SAE latents denser than this were left out of the selection
    density_tokens: int = 0  # the probe-train tokens each latent's density is counted on
    rule: str = ""  # a g-SAE: "with gradient" for "sae", its TopK fallback probed as FALLBACK_BASIS

    @property
    def bases(self) -> tuple[str, ...]:
        return BASES + ((FALLBACK_BASIS,) if self.rule else ())

    def to_dict(self) -> dict[str, Any]:
        from saelab.eval.core import _json_clean

        rule = {"rule": self.rule, "fallback_rule": FALLBACK_RULE} if self.rule else {}
        return _json_clean({"hook_name": self.hook_name, "n_latents": self.n_latents, "selection": self.selection,
                            "max_density": self.max_density, "level": self.level, "ks": self.ks, **rule,
                            "bases": list(self.bases) + ["dense"], "density_tokens": self.density_tokens,
                            "dense_density": DENSE_DENSITY, "tasks": self.tasks, "mean": self.mean})

    def _repr_html_(self) -> str:  # Jupyter: mean test accuracy per k of the SAE probe and its baselines
        from saelab.display import grid_html

        m = self.mean
        rows = [[k, m[str(k)]["sae_accuracy"], m[str(k)]["neurons_accuracy"], m[str(k)]["rotation_accuracy"],
                 m[str(k)]["sae_tasks_with_dense"]] for k in self.ks if str(k) in m]
        return grid_html(["k", "SAE latents", "neurons", "random rotation", "tasks with a dense latent"], rows,
                         title=f"sparse probing · {len(self.tasks)} {self.level}-level tasks · {_settings(self)} · "
                               f"mean test accuracy (dense probe {m['dense']['accuracy']:.3f})")


def sae_features(sae, x: torch.Tensor, batch: int = 8192, grad: torch.Tensor | None = None) -> np.ndarray:
    """Dense SAE latents [n, n_latents] (float32) of activations x [n, d]; with `grad` (the LM-loss gradient at
    each row) a g-SAE selects with it."""
    dense = [code.to_dense(sae.cfg.n_latents).float().cpu() for code in batch_codes(sae, x, batch, grad)]
    return torch.cat(dense).numpy()


def latent_density(sae, x: torch.Tensor, batch: int = 8192, grad: torch.Tensor | None = None) -> np.ndarray:
    """Share of the rows of x [n, d] on which each SAE latent is active (value != 0, as `active_entries` counts);
    with `grad`, a g-SAE's latents as it selects them with the gradient (as `sae_features`)."""
    from saelab.eval.core import active_entries

    F = sae.cfg.n_latents
    counts = torch.zeros(F, dtype=torch.int64)
    for code in batch_codes(sae, x, batch, grad):
        _, lat, _ = active_entries(code, F)
        counts += torch.bincount(lat.cpu(), minlength=F)
    return (counts.double() / max(x.shape[0], 1)).numpy()


def batch_codes(sae, x: torch.Tensor, batch: int, grad: torch.Tensor | None = None):
    """The SAE's codes of x [n, d], `batch` rows at a time on the SAE's device (`encode`: no autograd); with `grad`
    (the LM-loss gradient at each row) a g-SAE selects with it."""
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].to(sae.W_dec.device)
        yield sae.encode(xb) if grad is None else sae.encode(xb, grad=grad[i:i + batch].to(xb.device))


def train_density(data: ProbeData, sae) -> tuple[np.ndarray, int]:
    """(density of each SAE latent over the probe-train tokens, how many tokens): `data.density` when gathered
    with the data, else counted from the train rows (of z for pre-pooled latents, else of x through the SAE)."""
    if data.density is not None:
        return data.density, data.density_tokens
    train = ~np.asarray(data.is_test, dtype=bool)
    if data.z is not None:
        return (data.z[torch.from_numpy(train)] != 0).double().mean(0).numpy(), int(train.sum())
    rows = torch.from_numpy(train)
    grad = None if data.grad is None else data.grad[rows]  # a g-SAE's density under its own rule
    return latent_density(sae, data.x[rows], grad=grad), int(train.sum())


def probe_tasks(data: ProbeData, sae, ks: Sequence[int] = KS, selection: str = "mean_diff",
                n_train: int = 2000, n_test: int = 500, seed: int = 0, rotation_seed: int = 0,
                hook_name: str = "", progress: bool = False, max_density: float | None = None) -> ProbingResult:
    """Run every task of `data`: k-sparse probes on SAE latents, neurons and a random rotation, and a dense probe.

    n_train / n_test: examples per class (balanced), at most; a task with fewer than 5 of either class in train
    or test is reported as skipped. max_density: SAE latents active on more than this share of the probe-train
    tokens are not selected (None: all may be).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks must be positive integers, got {ks}")
    if selection not in SELECTIONS:
        raise ConfigError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if max_density is not None and not 0 < max_density <= 1:
        raise ConfigError(f"max_density must be in (0, 1] (a share of tokens), got {max_density}",
                          hint="e.g. 0.1 leaves out latents active on more than 10 % of tokens")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # the fits are small: BLAS threads only add overhead (and contend on a busy CPU)
        return _probe_tasks(data, sae, ks, selection, n_train, n_test, seed, rotation_seed, hook_name, progress,
                            max_density)


def _probe_tasks(data, sae, ks, selection, n_train, n_test, seed, rotation_seed, hook_name, progress, max_density):
    rng = np.random.default_rng(seed)
    X_all = data.x.numpy()
    Q = random_rotation(X_all.shape[1], rotation_seed).numpy()
    train_pool = np.flatnonzero(~data.is_test)
    test_pool = np.flatnonzero(data.is_test)
    density, n_density = train_density(data, sae)
    too_dense = None if max_density is None else density > max_density
    if too_dense is not None and too_dense.all():
        raise ConfigError(f"max_density {max_density} leaves no latent to select: the least dense is active on "
                          f"{100 * density.min():.3g} % of the probe-train tokens", hint="raise max_density")
    result = ProbingResult(hook_name or sae.cfg.hook_name, sae.cfg.n_latents, selection, ks, level=data.kind,
                           max_density=max_density, density_tokens=n_density,
                           rule=GRAD_RULE if data.grad is not None or data.z_fallback is not None else "")
    items = list(data.labels.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="probing", unit="task")
    for task, y in items:
        tr = balanced_indices(y, train_pool, n_train, rng)
        te = balanced_indices(y, test_pool, n_test, rng)
        if len(tr) < 10 or len(te) < 10:
            result.tasks[task] = {"skipped": f"too few examples of a class (train {len(tr)}, test {len(te)})"}
            continue
        ytr, yte = y[tr].astype(int), y[te].astype(int)
        feats = {"neurons": (X_all[tr], X_all[te]), "rotation": (X_all[tr] @ Q, X_all[te] @ Q)}
        if data.z is not None:
            feats["sae"] = (data.z[tr].numpy(), data.z[te].numpy())
        else:
            g = (None, None) if data.grad is None else (data.grad[tr], data.grad[te])
            feats["sae"] = (sae_features(sae, data.x[tr], grad=g[0]), sae_features(sae, data.x[te], grad=g[1]))
        if data.z_fallback is not None:
            feats[FALLBACK_BASIS] = (data.z_fallback[tr].numpy(), data.z_fallback[te].numpy())
        elif data.grad is not None:
            feats[FALLBACK_BASIS] = (sae_features(sae, data.x[tr]), sae_features(sae, data.x[te]))
        entry: dict[str, Any] = {"n_train": int(len(tr)), "n_test": int(len(te)),
                                 "positive_rate": float(y[y >= 0].mean()), "k": {}}
        order = {b: rank_features(f[0], ytr, selection, exclude=too_dense if b.startswith("sae") else None)[:max(ks)]
                 for b, f in feats.items()}
        for k in ks:
            row = {}
            for b in result.bases:
                Xtr, Xte = feats[b]
                idx = order[b][:k]
                row[b] = fit_probe(Xtr[:, idx], ytr, Xte[:, idx], yte)
                row[b]["features"] = [int(i) for i in idx]  # latent ids (sae) / dimensions (neurons, rotation)
            row["sae"]["densities"] = [float(density[i]) for i in row["sae"]["features"]]
            row["sae"]["n_dense"] = sum(d > DENSE_DENSITY for d in row["sae"]["densities"])
            entry["k"][str(k)] = row
        entry["dense"] = fit_probe(X_all[tr], ytr, X_all[te], yte)
        result.tasks[task] = entry
    done = [t for t in result.tasks.values() if "k" in t]
    if not done:
        raise DataError("no task had enough examples of both classes to probe")
    for k in ks:
        result.mean[str(k)] = {f"{b}_{m}": float(np.mean([t["k"][str(k)][b][m] for t in done]))
                               for b in result.bases for m in ("accuracy", "f1", "auroc")}
        result.mean[str(k)]["sae_tasks_with_dense"] = sum(t["k"][str(k)]["sae"]["n_dense"] > 0 for t in done)
    result.mean["dense"] = {m: float(np.mean([t["dense"][m] for t in done])) for m in ("accuracy", "f1", "auroc")}
    k1 = str(ks[0])
    result.mean["sae_beats_neurons_at_k"] = {str(k): result.mean[str(k)]["sae_accuracy"]
                                             > result.mean[str(k)]["neurons_accuracy"] for k in ks}
    result.mean["n_tasks"] = len(done)
    result.mean["k_min"] = int(k1)
    return result


def _settings(r: ProbingResult) -> str:
    return f"selection {r.selection}" + (f", max density {r.max_density:g}" if r.max_density is not None else "")


def format_probing(r: ProbingResult) -> str:
    """Table: per task test accuracy of the SAE / neuron / rotation probes at the smallest, a middle and the
    largest k, and the smallest k's SAE latents with their densities (DENSE above DENSE_DENSITY)."""
    ks = [str(k) for k in r.ks]
    shown = [ks[0]] + ([ks[len(ks) // 2]] if len(ks) > 2 else []) + ([ks[-1]] if len(ks) > 1 else [])
    k1 = ks[0]
    head = (f"{'task':<14}" + "".join(f"  k={k:<3} sae  neur  rot " for k in shown)
            + f"  dense   k={k1} latents (density)")
    lines = [f"sparse probing  {r.hook_name}  ({r.n_latents:,} latents, {r.level} level, {_settings(r)}; "
             f"test accuracy; densities over {r.density_tokens:,} probe-train tokens)",
             head]
    for task, t in r.tasks.items():
        if "k" not in t:
            lines.append(f"{task:<14}  skipped: {t['skipped']}")
            continue
        cells = "".join(f"        {t['k'][k]['sae']['accuracy']:.3f} {t['k'][k]['neurons']['accuracy']:.3f} "
                        f"{t['k'][k]['rotation']['accuracy']:.3f}" for k in shown)
        sel = t["k"][k1]["sae"]
        latents = ", ".join(f"#{i} ({_pct(d)}{' DENSE' if d > DENSE_DENSITY else ''})"
                            for i, d in zip(sel["features"], sel["densities"]))
        lines.append(f"{task:<14}{cells}  {t['dense']['accuracy']:.3f}   {latents}")
    m = r.mean
    cells = "".join(f"        {m[k]['sae_accuracy']:.3f} {m[k]['neurons_accuracy']:.3f} "
                    f"{m[k]['rotation_accuracy']:.3f}" for k in shown)
    lines.append(f"{'mean':<14}{cells}  {m['dense']['accuracy']:.3f}")
    verdict = "beats" if m["sae_beats_neurons_at_k"][k1] else "does NOT beat"
    lines.append(f"k={k1}: the SAE probe {verdict} the neuron probe on average "
                 f"({m[k1]['sae_accuracy']:.3f} vs {m[k1]['neurons_accuracy']:.3f} accuracy, "
                 f"AUROC {m[k1]['sae_auroc']:.3f} vs {m[k1]['neurons_auroc']:.3f})")
    if r.rule:  # a g-SAE: its own rule (the sae columns) against its TopK fallback
        lines.append(f"g-SAE, mean test accuracy {r.rule} (sae) / {FALLBACK_RULE}: " + ", ".join(
            f"k={k} {m[k]['sae_accuracy']:.3f} / {m[k][FALLBACK_BASIS + '_accuracy']:.3f}" for k in shown))
    n_dense = m[k1]["sae_tasks_with_dense"]
    if n_dense:
        lines.append(f"k={k1}: {n_dense} of {m['n_tasks']} tasks select a dense latent (active on more than "
                     f"{100 * DENSE_DENSITY:g} % of tokens); --max-density {DENSE_DENSITY:g} leaves such latents out, "
                     f"--selection probe_loss ranks by what one latent alone predicts")
    return "\n".join(lines)


def _pct(share: float) -> str:
    return f"{100 * share:.2g} %" if share < 0.1 else f"{100 * share:.0f} %"


__all__ = ["KS", "SELECTIONS", "LEVELS", "ProbeData", "ProbingResult", "gather_token_data", "reference_data",
           "gather_sequence_data", "load_labelled", "read_rows", "load_spans", "gather_span_data", "balanced_indices",
           "rank_features", "probe_losses", "fit_probe", "binary_metrics", "random_rotation", "sae_features",
           "latent_density", "train_density", "probe_tasks", "format_probing", "hook_rows", "DENSE_DENSITY",
           "FALLBACK_BASIS"]

"""Contrast-pair tasks for patching: clean/corrupted prompts of equal token length and a logit-difference metric.

A task is a list of pairs. Each pair has a clean prompt whose next token should be `answer` and a corrupted prompt
(one symmetric token replacement away, §6 of the evals notes) whose next token should be `wrong`. The metric of a
run is the logit difference at the last position, averaged over pairs:

    LD(x) = mean_i ( logit(x_i)[answer_i] − logit(x_i)[wrong_i] )

so LD(clean) > 0 > LD(corrupted) when the model solves the task. Patching effects are normalised with it in
`saelab.eval.patching` ((LD_patched − LD_corrupted) / (LD_clean − LD_corrupted)).

Built-in tasks (generated from templates with single-token names, filtered so that every prompt of a task has the
same token length under the model's tokenizer):
    bracket  `    x = y(z`  vs `    x = y[z`                      → `)` vs `]`     (bracket closing)
    copy     `    def __init__(self, x):\n        self.x =`  (x swapped for another name) → ` x` vs ` y`
    quote    `    x = 'y`   vs `    x = "y`                        → `'` vs `"`     (quote closing)
    ioi      `When A and B went to the P, B gave the O to` vs the same with the second B → A   → ` A` vs ` B`
             (indirect-object identification for GPT-2-style English models; names/places/objects in task_data/)
User pairs: a JSONL file with one {"clean", "corrupted", "answer", "wrong"} object per line.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.errors import ConfigError, DataError

DATA_DIR = Path(__file__).resolve().parent / "task_data"

# single-token identifiers in the reference tokenizer (with and without a leading space); other tokenizers filter
IDENTIFIERS = ("name value data key item result path obj node text line size count index args func parent child "
               "config options start end prefix suffix target source mode level state buffer message filename width "
               "height offset length token label stream module").split()


@dataclass
class ContrastPairs:
    """Prompt pairs as text. `answer[i]` is right for `clean[i]`, `wrong[i]` is right for `corrupted[i]`."""

    name: str
    clean: list[str]
    corrupted: list[str]
    answer: list[str]
    wrong: list[str]

    def __post_init__(self):
        n = len(self.clean)
        if not n:
            raise DataError(f"task {self.name!r} has no prompt pairs")
        for field in ("corrupted", "answer", "wrong"):
            if len(getattr(self, field)) != n:
                raise DataError(f"task {self.name!r}: {len(getattr(self, field))} {field} entries for {n} clean "
                                f"prompts")

    def __len__(self) -> int:
        return len(self.clean)

    def subset(self, n: int) -> "ContrastPairs":
        return ContrastPairs(self.name, self.clean[:n], self.corrupted[:n], self.answer[:n], self.wrong[:n])


@dataclass
class TaskBatch:
    """Token ids of a task: `clean`/`corrupted` [N, L] (same L), `answer`/`wrong` [N] single-token ids. The metric
    reads the logits at the last position."""

    name: str
    clean: torch.Tensor
    corrupted: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    pairs: ContrastPairs

    @property
    def n_pairs(self) -> int:
        return self.clean.shape[0]

    @property
    def length(self) -> int:
        return self.clean.shape[1]

    def to(self, device) -> "TaskBatch":
        return TaskBatch(self.name, self.clean.to(device), self.corrupted.to(device), self.answer.to(device),
                         self.wrong.to(device), self.pairs)


# ================================================================================================ metric
def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """Per-row logit(answer) − logit(wrong) at the last position; `logits` [N, L, V] (or [N, V]), answers [N].
    Rows may be a multiple of N (stacked patched copies): answers repeat."""
    last = logits[:, -1] if logits.dim() == 3 else logits
    reps = last.shape[0] // answer.shape[0]
    a, w = answer.repeat(reps), wrong.repeat(reps)
    return last.gather(1, a[:, None])[:, 0] - last.gather(1, w[:, None])[:, 0]


@torch.no_grad()
def solve_rate(model, batch: TaskBatch) -> dict:
    """How often the model solves the task: clean prompts prefer `answer` over `wrong`, corrupted prompts the
    reverse, and both at once; plus the mean logit differences."""
    ld_c = logit_diff(model(batch.clean), batch.answer, batch.wrong)
    ld_r = logit_diff(model(batch.corrupted), batch.answer, batch.wrong)
    return {"task": batch.name, "n_pairs": batch.n_pairs, "length": batch.length,
            "clean_accuracy": float((ld_c > 0).float().mean()), "corrupted_accuracy": float((ld_r < 0).float().mean()),
            "both_accuracy": float(((ld_c > 0) & (ld_r < 0)).float().mean()),
            "logit_diff_clean": float(ld_c.mean()), "logit_diff_corrupted": float(ld_r.mean())}


# ================================================================================================ tokenizing
def _tokenizer(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _is_one_token(tokenizer, ids: list[int]) -> bool:
    """One token, and not the unknown token (a word-level vocabulary maps every unknown word to it)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return len(ids) == 1 and (unk is None or ids[0] != unk)


def single_token(tokenizer, text: str) -> int:
    """The id of `text` if it is exactly one token, else a DataError naming its pieces."""
    ids = _encode(tokenizer, text)
    if not _is_one_token(tokenizer, ids):
        pieces = [tokenizer.decode([i]) for i in ids]
        raise DataError(f"answer {text!r} is {len(ids)} tokens {pieces} under this model's tokenizer; answers must "
                        f"be one token", hint="pick an answer that is a single token (often with a leading space)")
    return ids[0]


def tokenize_pairs(model, pairs: ContrastPairs) -> TaskBatch:
    """Token ids of every prompt (the model's own BOS convention, `model.to_tokens`), checked: clean and corrupted
    of one pair have equal length, all pairs share one length, every answer is one token."""
    tok = _tokenizer(model)
    rows_c, rows_r = [], []
    for i, (c, r) in enumerate(zip(pairs.clean, pairs.corrupted)):
        tc, tr = model.to_tokens(c)[0].cpu(), model.to_tokens(r)[0].cpu()
        if tc.numel() != tr.numel():
            raise DataError(f"task {pairs.name!r} pair {i}: clean prompt is {tc.numel()} tokens, corrupted is "
                            f"{tr.numel()} ({c!r} vs {r!r})",
                            hint="patching compares positions, so each pair must tokenize to the same length")
        if rows_c and tc.numel() != rows_c[0].numel():
            raise DataError(f"task {pairs.name!r} pair {i} is {tc.numel()} tokens, pair 0 is {rows_c[0].numel()}; "
                            f"all prompts of a task must have the same token length ({c!r})",
                            hint="split the pairs into tasks of one length each")
        rows_c.append(tc)
        rows_r.append(tr)
    answer = torch.tensor([single_token(tok, a) for a in pairs.answer])
    wrong = torch.tensor([single_token(tok, w) for w in pairs.wrong])
    return TaskBatch(pairs.name, torch.stack(rows_c), torch.stack(rows_r), answer, wrong, pairs)


# ================================================================================================ generators
def _singles(tokenizer, words, space: bool = True, bare: bool = False) -> list[str]:
    """Words that are one token with a leading space (and, with `bare`, without one too)."""
    out = []
    for w in words:
        if space and not _is_one_token(tokenizer, _encode(tokenizer, " " + w)):
            continue
        if bare and not _is_one_token(tokenizer, _encode(tokenizer, w)):
            continue
        out.append(w)
    return out


def _keep_one_length(tokenizer, pairs: ContrastPairs, n: int) -> ContrastPairs:
    """Drop pairs whose prompts tokenize to another length than the most common one (BPE merges across a template
    slot can change it), then keep the first n."""
    lens = [(len(_encode(tokenizer, c)), len(_encode(tokenizer, r))) for c, r in zip(pairs.clean, pairs.corrupted)]
    common = Counter(lc for lc, lr in lens if lc == lr).most_common(1)
    if not common:
        raise DataError(f"task {pairs.name!r}: no pair has a clean and corrupted prompt of equal token length under "
                        f"this tokenizer")
    keep = [i for i, (lc, lr) in enumerate(lens) if lc == lr == common[0][0]][:n]
    if len(keep) < n:
        raise DataError(f"task {pairs.name!r}: only {len(keep)} of the {n} requested pairs tokenize to one length "
                        f"under this tokenizer", hint="ask for fewer pairs (--pairs)")
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return ContrastPairs(pairs.name, pick(pairs.clean), pick(pairs.corrupted), pick(pairs.answer), pick(pairs.wrong))


def _name_triples(names: list[str], n: int, seed: int, k: int = 3) -> list[tuple[str, ...]]:
    if len(names) < k:
        raise DataError(f"only {len(names)} usable names (single tokens under this tokenizer); need at least {k}")
    rng = random.Random(seed)
    return [tuple(rng.sample(names, k)) for _ in range(n)]


def _identifier_task(name: str, tokenizer, n: int, seed: int, make) -> ContrastPairs:
    """Pairs from `make(x, y, z) -> (clean, corrupted, answer, wrong)` over random triples of distinct
    single-token identifiers."""
    names = _singles(tokenizer, IDENTIFIERS, bare=True)
    rows = [make(*t) for t in _name_triples(names, 4 * n, seed)]
    return _keep_one_length(tokenizer, ContrastPairs(name, *map(list, zip(*rows))), n)


def bracket_task(tokenizer, n: int = 64, seed: int = 0) -> ContrastPairs:
    """Bracket closing: `    x = y(z` → `)`, corrupted `    x = y[z` → `]`."""
    return _identifier_task("bracket", tokenizer, n, seed,
                            lambda x, y, z: (f"    {x} = {y}({z}", f"    {x} = {y}[{z}", ")", "]"))


def copy_task(tokenizer, n: int = 64, seed: int = 0) -> ContrastPairs:
    """Variable copying (induction): `def __init__(self, x):\\n        self.x =` → ` x`; corrupted with the argument
    and attribute renamed to y → ` y`."""
    return _identifier_task("copy", tokenizer, n, seed, lambda x, y, z: (
        f"    def __init__(self, {x}):\n        self.{x} =", f"    def __init__(self, {y}):\n        self.{y} =",
        f" {x}", f" {y}"))


def quote_task(tokenizer, n: int = 64, seed: int = 0) -> ContrastPairs:
    """Quote closing: `    x = 'y` → `'`, corrupted `    x = "y` → `"`."""
    return _identifier_task("quote", tokenizer, n, seed,
                            lambda x, y, z: (f"    {x} = '{y}", f'    {x} = "{y}', "'", '"'))


def read_word_list(name: str) -> list[str]:
    """A word list from task_data/ (`ioi_names`, `ioi_places`, `ioi_objects`): one word a line, # comments."""
    path = DATA_DIR / f"{name}.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


IOI_TEMPLATES = (
    "When {A} and {B} went to the {P}, {S} gave the {O} to",
    "After {A} and {B} went to the {P}, {S} gave a {O} to",
    "Then, {A} and {B} had a long day at the {P}. {S} gave the {O} to",
    "When {A} and {B} got a {O} at the {P}, {S} decided to give it to",
)


def ioi_task(tokenizer, n: int = 64, seed: int = 0) -> ContrastPairs:
    """Indirect-object identification (Wang et al. 2022 templates, offline lists): clean `When A and B went to the
    P, B gave the O to` → ` A`; corrupted: the second B replaced by A (the S2 swap of the RelP demo) → ` B`.
    Only names, places and objects that are one token with a leading space are used."""
    names = _singles(tokenizer, read_word_list("ioi_names"))
    places = _singles(tokenizer, read_word_list("ioi_places"))
    objects = _singles(tokenizer, read_word_list("ioi_objects"))
    if len(names) < 2 or not places or not objects:
        raise DataError(f"the IOI lists leave {len(names)} names, {len(places)} places, {len(objects)} objects that "
                        f"are single tokens under this tokenizer; need 2 names and 1 of each other",
                        hint="IOI is for English GPT-2-style tokenizers; use --task bracket/copy/quote on the "
                             "reference model")
    rng = random.Random(seed)
    c, r, a, w = [], [], [], []
    for _ in range(4 * n):
        A, B = rng.sample(names, 2)
        tpl, P, O = rng.choice(IOI_TEMPLATES), rng.choice(places), rng.choice(objects)
        c.append(tpl.format(A=A, B=B, P=P, O=O, S=B))
        r.append(tpl.format(A=A, B=B, P=P, O=O, S=A))
        a.append(f" {A}")
        w.append(f" {B}")
    # templates differ in length: keep the most common one
    return _keep_one_length(tokenizer, ContrastPairs("ioi", c, r, a, w), n)


def load_pairs_jsonl(path: str | Path, n: int | None = None) -> ContrastPairs:
    """User pairs: one JSON object per line with keys clean, corrupted, answer, wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {str(path)!r} does not exist")
    c, r, a, w = [], [], [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
        missing = [k for k in ("clean", "corrupted", "answer", "wrong") if not isinstance(obj.get(k), str)]
        if missing:
            raise DataError(f"{path}:{i + 1}: missing string field(s) {missing}",
                            hint='each line: {"clean": ..., "corrupted": ..., "answer": ..., "wrong": ...}')
        c.append(obj["clean"])
        r.append(obj["corrupted"])
        a.append(obj["answer"])
        w.append(obj["wrong"])
    pairs = ContrastPairs(path.stem, c, r, a, w)
    return pairs.subset(n) if n else pairs


TASKS = {"bracket": bracket_task, "copy": copy_task, "quote": quote_task, "ioi": ioi_task}


def check_task(task: str) -> None:
    """Refuse an unknown task name or a malformed pairs file before any model loads."""
    if task not in TASKS:
        _pairs_file(task)


def make_task(model, task: str, n: int = 64, seed: int = 0) -> TaskBatch:
    """A built-in task by name (`TASKS`) or a JSONL file of pairs, tokenized and checked for `model`."""
    pairs = TASKS[task](_tokenizer(model), n, seed) if task in TASKS else _pairs_file(task, n)
    return tokenize_pairs(model, pairs)


def _pairs_file(task: str, n: int | None = None) -> ContrastPairs:
    if task.endswith(".jsonl") or Path(task).is_file():
        return load_pairs_jsonl(task, n)
    raise ConfigError(f"task: unknown task {task!r}; built-in tasks are {sorted(TASKS)}, or give a .jsonl file "
                      f"of pairs")


__all__ = ["ContrastPairs", "TaskBatch", "TASKS", "make_task", "check_task", "tokenize_pairs", "logit_diff", "solve_rate",
           "bracket_task", "copy_task", "quote_task", "ioi_task", "load_pairs_jsonl", "read_word_list",
           "single_token"]

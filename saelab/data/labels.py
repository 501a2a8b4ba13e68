"""Ground-truth per-token labels of Python source, for probing: what Python's own `tokenize` (and `ast`, for
docstrings) says each BPE token of the model is.

Tasks (`TASKS`, one binary label per BPE token each):
    string        inside a string literal (prefix and quotes included), docstrings excluded
    comment       inside a `#` comment
    docstring     inside a docstring (the first statement of a module, class or function, a string literal)
    keyword       a Python keyword (`keyword.kwlist`: def, return, if, None, True, ...)
    kw_def, kw_return, kw_import, self   the name `def` / `return` / `import` / `self` itself
    number        a numeric literal
    identifier    a name that is not a keyword (`self` included)
    operator      an operator token: any OP except brackets and the delimiters , : . ;
    in_brackets   bracket depth > 0 at the token's first character: inside (), [] or {} (so an opening bracket
                  itself is at the outer depth and a closing bracket at the inner one)
    line_start    the token holding the first non-blank character of a physical line
    indent_2plus  on a non-blank line indented two levels or more: leading whitespace >= 8 columns (two PEP 8
                  levels of 4; tabs expand to 8), comment and continuation lines included

Alignment rule (a BPE token may span two categories, e.g. ` "` = a space and an opening quote): every character
of the source gets its categories, and a BPE token takes the categories of its FIRST NON-WHITESPACE character
(of its first character if it is all whitespace). So ` "` is `string` and `=(` is `operator`. The same rule
(`chars_to_tokens`) labels a user's character spans for token-level probing (`span_labels`): a token is inside a
span when its first non-whitespace character is.

Files that `tokenize` or `ast` cannot parse are skipped (returned as None).
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from dataclasses import dataclass
from typing import Sequence

import numpy as np

TASKS = ("string", "comment", "docstring", "keyword", "kw_def", "kw_return", "kw_import", "self", "number",
         "identifier", "operator", "in_brackets", "line_start", "indent_2plus")
_COL = {t: i for i, t in enumerate(TASKS)}
INDENT_WIDTH = 4
_OPEN, _CLOSE = "([{", ")]}"
_NOT_OPERATORS = set("()[]{},:.;")
_STRING_TYPES = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE",
                                                                       "FSTRING_END") if hasattr(tokenize, n)}


@dataclass
class LabelledText:
    """One text: its BPE token ids (no BOS/EOS) and labels [n_tokens, n_tasks]: bool for the code tasks
    (`TASKS`), int8 with −1 = unlabelled for a user's span tasks (`span_labels`)."""

    key: str
    ids: np.ndarray
    labels: np.ndarray


def char_labels(source: str) -> np.ndarray | None:
    """Bool [len(source), len(TASKS)]: the categories of every character; None if the source does not parse."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
        tree = ast.parse(source)
    except (tokenize.TokenError, SyntaxError, IndentationError, ValueError, RecursionError, MemoryError):
        return None
    lines = source.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(line) for line in lines])

    def offset(row: int, col: int) -> int:  # tokenize / ast rows are 1-based; columns are characters
        return int(starts[row - 1]) + col if row - 1 < len(starts) else len(source)

    lab = np.zeros((len(source), len(TASKS)), dtype=bool)
    # docstrings from the AST: (start, end) character spans
    doc_spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                v = first.value
                doc_spans.append((offset(v.lineno, v.col_offset), offset(v.end_lineno, v.end_col_offset)))
    for a, b in doc_spans:
        lab[a:b, _COL["docstring"]] = True

    delta = np.zeros(len(source) + 2, dtype=np.int64)  # bracket depth changes, per character
    for tok in toks:
        a, b = offset(*tok.start), offset(*tok.end)
        if b <= a:
            continue
        if tok.type in _STRING_TYPES:
            if not lab[a, _COL["docstring"]]:
                lab[a:b, _COL["string"]] = True
        elif tok.type == tokenize.COMMENT:
            lab[a:b, _COL["comment"]] = True
        elif tok.type == tokenize.NUMBER:
            lab[a:b, _COL["number"]] = True
        elif tok.type == tokenize.NAME:
            if keyword.iskeyword(tok.string):
                lab[a:b, _COL["keyword"]] = True
                for kw in ("def", "return", "import"):
                    if tok.string == kw:
                        lab[a:b, _COL[f"kw_{kw}"]] = True
            else:
                lab[a:b, _COL["identifier"]] = True
                if tok.string == "self":
                    lab[a:b, _COL["self"]] = True
        elif tok.type == tokenize.OP:
            if tok.string not in _NOT_OPERATORS:
                lab[a:b, _COL["operator"]] = True
        if tok.type == tokenize.OP and tok.string in _OPEN + _CLOSE:
            delta[a + 1] += 1 if tok.string in _OPEN else -1
    # depth at a character = brackets opened and not closed before it
    lab[:, _COL["in_brackets"]] = np.cumsum(delta)[:len(source)] > 0
    # line starts and indentation, per physical line
    for i, line in enumerate(lines):
        body = line.lstrip()
        if body.strip():
            lab[starts[i] + len(line) - len(body), _COL["line_start"]] = True
            if len(line[:len(line) - len(body)].expandtabs(8)) >= 2 * INDENT_WIDTH:
                lab[starts[i]:starts[i + 1], _COL["indent_2plus"]] = True
    return lab


def chars_to_tokens(chars: np.ndarray, source: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Per-token rows [n_tokens, ...] from per-character rows `chars` [len(source), ...] by the alignment rule
    (module docstring): each token takes the row of its first non-whitespace character; a token with no
    characters of `source` gets zeros."""
    out = np.zeros((len(offsets), *chars.shape[1:]), dtype=chars.dtype)
    for j, (a, b) in enumerate(offsets):
        if b <= a or a >= len(source):
            continue
        piece = source[a:b]
        lead = len(piece) - len(piece.lstrip())
        out[j] = chars[a + (lead if lead < len(piece) else 0)]
    return out


def token_labels(source: str, offsets: list[tuple[int, int]]) -> np.ndarray | None:
    """Bool [n_tokens, len(TASKS)] for BPE tokens with character `offsets` (start, end); None if unparsable."""
    chars = char_labels(source)
    return None if chars is None else chars_to_tokens(chars, source, offsets)


def token_offsets(text: str, tokenizer) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The model's (fast) tokenizer's BPE ids of `text` (no BOS/EOS added) and each token's character (start, end)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["input_ids"], dtype=np.int64), enc["offset_mapping"]


def label_text(source: str, tokenizer, key: str = "") -> LabelledText | None:
    """Tokenize `source` with the model's (fast) tokenizer and label every token; None if it does not parse."""
    ids, offsets = token_offsets(source, tokenizer)
    labels = token_labels(source, offsets)
    return None if labels is None else LabelledText(key, ids, labels)


def span_labels(text: str, spans: dict[str, list[tuple[int, int]]], tasks: Sequence[str], tokenizer,
                key: str = "") -> LabelledText:
    """A user's text with positive character spans (start, end) per task → int8 labels [n_tokens, len(tasks)]:
    1 for a token inside a span of the task (alignment rule), 0 outside; −1 (unlabelled) for every token of a
    task that `spans` lacks, and for special tokens (a literal `<|endoftext|>` in the text is no example)."""
    ids, offsets = token_offsets(text, tokenizer)
    chars = np.zeros((len(text), len(tasks)), dtype=np.int8)
    for j, task in enumerate(tasks):
        for a, b in spans.get(task, ()):
            chars[a:b, j] = 1
    labels = chars_to_tokens(chars, text, offsets)
    labels[:, [task not in spans for task in tasks]] = -1
    labels[np.isin(ids, tokenizer.all_special_ids)] = -1
    return LabelledText(key, ids, labels)


def label_corpus(spec, tokenizer, split: str = "validation", max_tokens: int | None = None) -> list[LabelledText]:
    """Labelled documents of a corpus split (unparsable files skipped), until `max_tokens` tokens are gathered."""
    from saelab.data.corpus import iter_documents

    out, n = [], 0
    for doc in iter_documents(spec, split):
        lt = label_text(doc.text, tokenizer, doc.key)
        if lt is None or not len(lt.ids):
            continue
        out.append(lt)
        n += len(lt.ids)
        if max_tokens is not None and n >= max_tokens:
            break
    return out


__all__ = ["TASKS", "LabelledText", "char_labels", "chars_to_tokens", "token_labels", "token_offsets", "label_text",
           "span_labels", "label_corpus"]

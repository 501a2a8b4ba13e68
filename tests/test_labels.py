"""Per-token code labels (saelab.data.labels) on hand-written snippets, checked against what a reader sees."""

import numpy as np
import pytest

from saelab.data.labels import TASKS, char_labels, label_text, token_labels


def _chars(src, task):
    lab = char_labels(src)
    return "".join(c for c, on in zip(src, lab[:, TASKS.index(task)]) if on)


def test_string_with_hash_is_string_not_comment():
    src = 'x = "a # b"\n'
    assert _chars(src, "string") == '"a # b"'
    assert _chars(src, "comment") == ""


def test_docstring_is_not_comment_nor_string():
    src = 'def f():\n    """Doc."""\n    # real comment\n    return "s"\n'
    assert _chars(src, "docstring") == '"""Doc."""'
    assert _chars(src, "comment") == "# real comment"
    assert _chars(src, "string") == '"s"'


def test_module_and_class_docstrings_and_a_later_string_statement():
    src = '"""Mod."""\nclass A:\n    """Cls."""\n    x = 1\n    "not a docstring"\n'
    assert _chars(src, "docstring") == '"""Mod.""""""Cls."""'
    assert _chars(src, "string") == '"not a docstring"'


def test_nested_brackets():
    src = "f(a, [b, (c)], {d: e})\ng\n"
    inside = _chars(src, "in_brackets")
    # everything after the first "(" up to and including the last ")" is inside; "f" and "g" are not
    assert inside == "a, [b, (c)], {d: e})"
    lab = char_labels(src)
    assert not lab[src.index("g"), TASKS.index("in_brackets")]


def test_keywords_names_numbers_operators_lines_indent():
    src = "import os\nclass A:\n    def f(self):\n        return self.x + 0x1F\n"
    assert _chars(src, "kw_import") == "import"
    assert _chars(src, "kw_def") == "def"
    assert _chars(src, "kw_return") == "return"
    assert _chars(src, "self") == "selfself"
    assert _chars(src, "keyword") == "importclassdefreturn"
    assert _chars(src, "number") == "0x1F"
    assert _chars(src, "operator") == "+"  # '.', ':' and brackets are delimiters, not operators
    assert _chars(src, "identifier") == "osAfselfselfx"
    assert _chars(src, "line_start") == "icdr"
    assert _chars(src, "indent_2plus") == "        return self.x + 0x1F\n"


def test_unparsable_source_gives_none():
    assert char_labels("def f(:\n") is None


def test_bpe_alignment_uses_first_non_blank_character():
    src = 'x = "a"  # c\n'
    # hand-made offsets: ' "' spans a blank and the quote; '  #' spans blanks and the hash; a pure blank token
    offsets = [(0, 1), (1, 3), (3, 5), (5, 6), (6, 7), (7, 10), (10, 12), (12, 13)]
    lab = token_labels(src, offsets)
    col = {t: lab[:, TASKS.index(t)] for t in TASKS}
    assert col["identifier"].tolist() == [True] + [False] * 7
    assert col["operator"].tolist() == [False, True] + [False] * 6  # ' =' starts with a blank, then '='
    assert col["string"].tolist() == [False, False, True, True, True, False, False, False]
    assert col["comment"].tolist() == [False] * 5 + [True, True, False]


@pytest.mark.parametrize("src", ['s = """multi\nline"""\n', "x = [\n    1,\n]\n"])
def test_with_the_reference_tokenizer(reference_tokenizer, src):
    lt = label_text(src, reference_tokenizer)
    assert lt.labels.shape == (len(lt.ids), len(TASKS))
    text = reference_tokenizer.decode(lt.ids.tolist())
    assert text == src
    assert lt.labels.any(0)[TASKS.index("line_start")]
    assert np.asarray(lt.labels).dtype == bool

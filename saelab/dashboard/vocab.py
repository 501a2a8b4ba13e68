"""Display strings for token ids: what an example shows for each token, cleaned once at build time."""

from __future__ import annotations

SHOW = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def display_token(text: str) -> str:
    """Newlines, carriage returns and tabs as visible marks (Neuronpedia's ↵); everything else as decoded."""
    return "".join(SHOW.get(ch, ch) for ch in text)


def display_vocab(tokenizer, vocab_size: int) -> list[str]:
    """One display string per token id. A token that is a fragment of a UTF-8 character decodes to U+FFFD on its
    own; it shows as its byte-level name instead (GPT-2's Ġ/Ċ alphabet mapped to space and ↵)."""
    out = []
    for i, text in enumerate(tokenizer.batch_decode([[i] for i in range(vocab_size)])):
        if "\ufffd" in text:
            name = tokenizer.convert_ids_to_tokens(i) or ""
            text = name.replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t")
        out.append(display_token(text))
    return out

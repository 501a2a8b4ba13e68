"""Text sources: the standard-library corpus (default), HF `datasets` names, local text/JSONL/parquet files.

Every source is read through one `CorpusSpec` and yields documents lazily, so a corpus bigger than RAM
streams. The train/validation split is a pure function of each document's key (the relative file path for
files, the text itself for dataset rows): no random seed, so it is identical on every machine and run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from saelab.errors import ConfigError, DataError
from saelab.settings import setting

SPLITS = ("train", "validation", "all")
LOCAL_SUFFIXES = {".txt": "text", ".py": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Document:
    key: str  # stable identity: relative path for files, "<source>#<sha>" for dataset rows
    text: str


@dataclass(frozen=True)
class CorpusSpec:
    """Where text comes from.

    source: "stdlib" (the running interpreter's standard library), an HF dataset name
    (e.g. "NeelNanda/pile-10k"), or a local path (file or directory of .txt/.py/.md/.jsonl/.parquet).
    """

    source: str = setting("stdlib", "corpus: 'stdlib', an HF dataset name or a local path", flag="--dataset")
    text_field: str = setting("text", "text field of dataset rows")
    hf_config: str | None = None
    hf_split: str = "train"
    validation_per_mille: int = 50  # 5 % of documents go to validation

    def __post_init__(self):
        if not self.source:
            raise ConfigError("corpus.source: must be 'stdlib', an HF dataset name or a local path")
        if not 0 <= self.validation_per_mille <= 1000:
            raise ConfigError(f"corpus.validation_per_mille: must be in [0, 1000], got {self.validation_per_mille}")

    @property
    def kind(self) -> str:
        if self.source == "stdlib":
            return "stdlib"
        if Path(self.source).expanduser().exists():
            return "local"
        return "hf"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def split_of(key: str, validation_per_mille: int) -> str:
    """Deterministic split: the first 8 bytes of sha256(key), modulo 1000."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "validation" if h % 1000 < validation_per_mille else "train"


def _stdlib_files() -> Iterator[tuple[str, Path]]:
    root = stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        # sorted walk so every machine yields documents in the same order
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                yield path.relative_to(root).as_posix(), path


class UndecodableFiles:
    """Policy for files that are not valid UTF-8: skip them and count them.

    Python source is UTF-8 by default (PEP 3120); the few stdlib files that are not are test fixtures with
    deliberately broken or legacy encodings, and guessing their encoding would teach the model mojibake.
    """

    def __init__(self):
        self.skipped: list[str] = []

    def read(self, key: str, path: Path) -> str | None:
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            self.skipped.append(key)
            return None


def _local_files(root: Path) -> Iterator[tuple[str, Path]]:
    if root.is_file():
        yield root.name, root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix in LOCAL_SUFFIXES:
                yield path.relative_to(root).as_posix(), path


def _text_key(source: str, text: str) -> str:
    return f"{source}#{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def _hf_rows(spec: CorpusSpec, kind: str, data_files: str | None = None, label: str | None = None) -> Iterator[Document]:
    """Rows of an HF dataset, or of one local JSONL/parquet file (`data_files`, keyed by its relative path `label`)."""
    import datasets

    try:
        if data_files is not None:
            ds = datasets.load_dataset(kind, data_files=data_files, split="train", streaming=True)
            label = label or Path(data_files).name
            where = data_files
        else:
            _fail_fast_if_offline(spec.source)
            ds = datasets.load_dataset(spec.source, spec.hf_config, split=spec.hf_split, streaming=True)
            label = where = spec.source
    except FileNotFoundError as e:
        raise DataError(f"corpus source {spec.source!r}: {e}") from e
    for row in ds:
        if spec.text_field not in row:
            raise DataError(f"corpus source {where!r} has no field {spec.text_field!r}; its fields are {sorted(row)}",
                            hint="pass --text-field with one of them")
        text = row[spec.text_field]
        if text:
            yield Document(_text_key(label, text), text)


def _fail_fast_if_offline(name: str) -> None:
    from saelab.hub import hub_reachable

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return  # let datasets look in its local cache
    if not hub_reachable():
        raise DataError(f"corpus source {name!r} is neither a local path nor reachable: the Hugging Face hub cannot "
                        f"be reached from this machine",
                        hint="use the default corpus (--dataset stdlib) or a local directory / .txt / .jsonl / "
                             ".parquet file")


def iter_documents(spec: CorpusSpec, split: str = "train", skipped: UndecodableFiles | None = None) -> Iterator[Document]:
    """Yield the documents of one split, lazily and in a fixed order."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    policy = skipped if skipped is not None else UndecodableFiles()

    def keep(key: str) -> bool:
        return split == "all" or split_of(key, spec.validation_per_mille) == split

    kind = spec.kind
    if kind in ("stdlib", "local"):
        files = _stdlib_files() if kind == "stdlib" else _local_files(Path(spec.source).expanduser())
        for key, path in files:
            fmt = LOCAL_SUFFIXES.get(path.suffix, "text")
            if fmt == "text":
                if keep(key):
                    text = policy.read(key, path)
                    if text:
                        yield Document(key, text)
            else:  # rows of a JSONL/parquet file go through HF datasets, split per row
                # keyed by the file's relative path, not its absolute one, so the split survives a move
                for doc in _hf_rows(spec, fmt, data_files=str(path), label=key):
                    if keep(doc.key):
                        yield doc
    else:
        for doc in _hf_rows(spec, kind):
            if keep(doc.key):
                yield doc
    if policy.skipped and skipped is None:
        warnings.warn(f"skipped {len(policy.skipped)} file(s) that are not valid UTF-8, e.g. {policy.skipped[:3]}")


def check_source(spec: CorpusSpec, split: str = "train") -> None:
    """Fail before any work starts (and before anything is written) when the corpus cannot give text: a local path
    that does not exist, or a local source with no text in `split`. Remote datasets are checked when opened."""
    from saelab.hub import looks_like_path

    kind = spec.kind
    if kind == "stdlib":
        return
    if kind == "hf":
        if looks_like_path(spec.source) or Path(spec.source).suffix in LOCAL_SUFFIXES:
            raise DataError(f"dataset {spec.source!r}: no such file or directory",
                            hint="give an existing file or directory (.txt/.py/.md/.jsonl/.json/.parquet), an HF "
                                 "dataset name, or stdlib")
        return
    policy = UndecodableFiles()
    if next(iter_documents(spec, split, skipped=policy), None) is not None:
        return
    hint = "give a file or directory that holds text (.txt/.py/.md/.jsonl/.json/.parquet)"
    undecodable = f" ({len(policy.skipped)} file(s) are not valid UTF-8)" if policy.skipped else ""
    if split != "all" and next(iter_documents(spec, "all", skipped=UndecodableFiles()), None) is not None:
        raise DataError(f"dataset {spec.source!r} has no text in its {split} split{undecodable}",
                        hint=f"documents are split by a hash of their name ({spec.validation_per_mille / 10:g} % go to "
                             f"validation), so a corpus of a few documents may have none in one split: add documents")
    raise DataError(f"dataset {spec.source!r} has no text{undecodable}", hint=hint)

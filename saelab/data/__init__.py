"""Text sources, tokenization and packing into fixed-length rows."""

from saelab.data.corpus import CorpusSpec, Document, iter_documents, split_of, stdlib_dir
from saelab.data.packing import batched_rows, iter_packed_rows, pack_rows, special_ids

__all__ = ["CorpusSpec", "Document", "iter_documents", "split_of", "stdlib_dir", "iter_packed_rows", "pack_rows",
           "batched_rows", "special_ids"]

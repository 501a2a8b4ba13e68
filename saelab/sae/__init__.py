"""Sparse autoencoders: the shared `SparseAutoencoder` and one small file per architecture."""

from saelab.sae.code import SparseCode
from saelab.sae.sae import ARCHITECTURES, SAEOutput, SparseAutoencoder, geometric_median

__all__ = ["SparseCode", "SparseAutoencoder", "SAEOutput", "ARCHITECTURES", "geometric_median"]

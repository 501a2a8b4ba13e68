"""Sparse autoencoders: the shared `SparseAutoencoder` and one small file per architecture."""

from saelab.sae.architectures import Architecture, get_architecture, registry
from saelab.sae.code import SparseCode
from saelab.sae.sae import SAEOutput, SparseAutoencoder, geometric_median

ARCHITECTURES = registry()  # name → Architecture class

__all__ = ["ARCHITECTURES", "Architecture", "SAEOutput", "SparseAutoencoder", "SparseCode", "geometric_median",
           "get_architecture", "registry"]

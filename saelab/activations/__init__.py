"""The activation store: `write_cache` (several hooks from one model pass, optional LM-loss gradients, sharded
npy files, crash-safe and resumable), `ActivationCache` (shuffled batches in bounded RAM with an exact cursor) and
`stream_activations` (the same batches straight from the model). One `Batch` type for every source."""

from saelab.activations.batch import Batch
from saelab.activations.format import CacheError
from saelab.activations.reader import ActivationCache
from saelab.activations.stream import ActivationStream, stream_activations
from saelab.activations.verify import describe, repair_cache, verify_cache
from saelab.activations.writer import write_cache

__all__ = ["Batch", "CacheError", "ActivationCache", "stream_activations", "ActivationStream", "write_cache",
           "verify_cache", "repair_cache", "describe"]

"""Evaluators. `core`: reconstruction, sparsity, density, and CE/KL with the SAE spliced into the model."""

from saelab.eval.core import (CoreMetrics, DownstreamStats, ReconstructionStats, evaluate_core, format_core,
                              hook_activation_mean, prediction_mask, reconstruction_metrics, special_mask)

__all__ = ["CoreMetrics", "ReconstructionStats", "DownstreamStats", "evaluate_core", "format_core",
           "reconstruction_metrics", "hook_activation_mean", "special_mask", "prediction_mask"]

"""Planted-feature benchmark: activations with known ground truth (`generate`), metrics of an SAE against it
(`score`), and the runner that trains several architectures on the same data (`run_benchmark`)."""

from saelab.synthetic.generator import PlantedData, TreeSpec, generate
from saelab.synthetic.metrics import score

__all__ = ["PlantedData", "TreeSpec", "generate", "score"]

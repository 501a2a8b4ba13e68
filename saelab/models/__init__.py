"""Language models: loading (`load_model`), hook names, the embedded reference model and its recipe."""

from saelab.models.loading import REFERENCE, check_hook_names, hook_layer, hook_names, load_model, reference_dir

__all__ = ["REFERENCE", "load_model", "hook_names", "check_hook_names", "hook_layer", "reference_dir"]

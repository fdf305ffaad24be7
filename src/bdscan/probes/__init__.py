"""Model layout (where the layers, heads and MLPs are) and hook context managers."""

from bdscan.probes.hooks import capture_inputs, capture_outputs, forward_hooks
from bdscan.probes.layout import LayerModules, ModelLayout, linear_weight, model_layout, unwrap

__all__ = [
    "capture_inputs", "capture_outputs", "forward_hooks",
    "LayerModules", "ModelLayout", "linear_weight", "model_layout", "unwrap",
]

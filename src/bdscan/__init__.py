"""bdscan: audit and repair backdoored language-model checkpoints and LoRA adapters."""

__version__ = "0.1.0"

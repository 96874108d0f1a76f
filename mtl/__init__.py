"""mtl: distributed multi-task and multi-domain training on Ray Train x DeepSpeed."""

__version__ = "0.1.0"

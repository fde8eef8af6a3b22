"""cerman: keeps pools of ready namespaces and extracted CRIU images per checkpoint."""

__version__ = "0.1.0"

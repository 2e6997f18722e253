"""nnx: method plugins, plugin-aware planning and mixed-quality annotations on top of nnU-Net v2 (2.8.1)."""

__version__ = "0.1.0"

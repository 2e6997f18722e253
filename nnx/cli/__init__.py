"""nnx_* command-line entry points."""

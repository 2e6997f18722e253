"""nnx method plugins, installed as ``nnx_plugins`` (one subpackage per method family)."""

"""Dataset converters (public dataset layouts -> nnU-Net/nnx raw datasets), installed as ``nnx_dataset_conversion``."""

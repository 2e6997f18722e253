"""``nnx_bench``: trainers side by side on the same plans and data (accuracy over seeds, speed and memory as
ratios to the stock trainer measured in the same run). See :mod:`nnx.cli.bench` and :mod:`nnx.bench.suite`."""

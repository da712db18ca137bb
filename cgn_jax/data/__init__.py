"""Datasets: raw MNIST sources, the MNIST variants, the on-disk dataset format, image sheets.

Modules: ``mnist_idx`` (IDX / TFDS readers), ``mnist_variants`` (recipes), ``build`` (write a
variant once), ``storage`` (the dataset directory format, also used for counterfactual sets),
``augment`` (colour jitter in JAX), ``sheets`` (PNG grids).
"""

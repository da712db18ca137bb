"""cgn_jax: Counterfactual Generative Networks in JAX/Flax."""

__version__ = "0.1.0"

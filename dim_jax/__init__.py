"""dim_jax: Dyadic Interaction Modeling (DIM, ECCV 2024) in JAX/Flax."""

__version__ = "0.1.0"

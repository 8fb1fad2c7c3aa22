"""PyTorch references of the official DIM classes, for the parity tests (needs torch and
x-transformers 1.30.16, the `parity` extra)."""

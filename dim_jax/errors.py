"""Errors a user can act on. `dim_jax.main` prints their message (what is wrong, where, what
to do) without a traceback; set DIM_JAX_TRACEBACK=1 to see the traceback as well."""


class DimJaxError(Exception):
  """Base of the errors caused by input, config or files rather than by a bug."""


class ConfigError(DimJaxError, ValueError):
  """A config field has a value no run can use; raised before anything is written."""

"""Annotation aliases shared by the entry points."""

import numpy as np
from jaxtyping import Array

# An array argument of an entry point: a jax array, or a NumPy array, which jax.nn and Equinox
# accept too. Converted with `jnp.asarray` on entry; its shape is checked all the same.
ArrayOrNumPy = Array | np.ndarray

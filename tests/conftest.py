import itertools

import jax
import pytest

# Small, fast defaults: tests compare float32 results at tight tolerances.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def getkey():
    """Fresh PRNG keys on demand: `getkey()` returns a new key each call."""
    counter = itertools.count()
    base = jax.random.key(0)
    return lambda: jax.random.fold_in(base, next(counter))

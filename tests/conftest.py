import itertools

import jax
import pytest

from eqx_attention import _kernels as kernels

# Small, fast defaults: tests compare float32 results at tight tolerances.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def getkey():
    """Fresh PRNG keys on demand: `getkey()` returns a new key each call."""
    counter = itertools.count()
    base = jax.random.key(0)
    return lambda: jax.random.fold_in(base, next(counter))


# Tiny blockwise tiles, so that a few dozen tokens already make several blocks (and partial
# ones along causal and window edges), and a short cache several decode blocks.
SMALL_BLOCKS = {"BLOCK_Q": 4, "BLOCK_K": 8, "FINE_Q": 2, "FINE_K": 4, "DECODE_BLOCK_K": 8}


@pytest.fixture
def small_blocks(monkeypatch):
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)

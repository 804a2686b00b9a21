"""Learned per-position vectors: positional encodings, feature padding and token masking."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

# Perceiver IO initialises its learned arrays (latents, positions, mask tokens) this way.
_INIT_SCALE = 0.02


def _init(key: PRNGKeyArray, shape: tuple[int, ...], dtype: Any) -> Array:
    return _INIT_SCALE * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


class TrainablePositionalEncoding(eqx.Module):
    """A learned vector for every position of a sequence of fixed length.

    Perceiver IO uses one as its latent array and as the output queries of a decoder.

    ```python
    enc = eqx_attention.TrainablePositionalEncoding(16, 64, key=jax.random.key(0))
    enc().shape                    # (16, 64)
    enc(jnp.array([3, 5])).shape   # (2, 64)
    ```
    """

    weight: Float[Array, "length dimension"]

    def __init__(self, length: int, dimension: int, dtype: Any = None, *, key: PRNGKeyArray):
        """**Arguments:**

        - `length`: number of positions.
        - `dimension`: size of each position's vector.
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `key`: PRNG key for the truncated-normal initialisation (standard deviation 0.02).
        """
        if length < 1 or dimension < 1:
            raise ValueError(
                f"length and dimension must be positive, got length={length}, dimension={dimension}"
            )
        self.weight = _init(key, (length, dimension), dtype)

    def __call__(
        self, positions: Int[Array, " n"] | None = None, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "n dimension"]:
        """**Arguments:**

        - `positions`: optional indices of the positions to return; defaults to all.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        Array of shape `(n, dimension)`, `n = len(positions)` or `length`.
        """
        return self.weight if positions is None else self.weight[positions]


class TrainablePositionalPadding(eqx.Module):
    """Pads every vector of a sequence up to `d_max` channels with one learned vector.

    Multimodal Perceivers use it to give every modality the same width before
    concatenating them along the sequence.
    """

    padding: Float[Array, " pad"]
    size: int = eqx.field(static=True)

    def __init__(self, size: int, d_max: int, dtype: Any = None, *, key: PRNGKeyArray):
        """**Arguments:**

        - `size`: number of channels of the input vectors.
        - `d_max`: number of channels after padding, at least `size`.
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `key`: PRNG key for the initialisation.
        """
        if d_max < size:
            raise ValueError(f"d_max={d_max} must be at least size={size}")
        self.size = size
        self.padding = _init(key, (d_max - size,), dtype)

    def __call__(
        self, x: Float[Array, "seq size"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq d_max"]:
        """**Arguments:**

        - `x`: sequence of shape `(seq, size)`.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        `x` with the learned padding appended to every position: `(seq, d_max)`.
        """
        if x.shape[-1] != self.size:
            raise ValueError(f"x.shape[-1] must equal size={self.size}, got {x.shape[-1]}")
        pad = jnp.broadcast_to(self.padding.astype(x.dtype), (x.shape[0], self.padding.shape[0]))
        return jnp.concatenate([x, pad], axis=-1)


class TrainablePositionalMasking(eqx.Module):
    """Replaces each position's vector by a learned mask token with probability `rate`.

    Masked-modelling objectives (as in multimodal Perceiver IO) train on inputs corrupted
    this way. With `inference=True` (or `rate == 0`) it is the identity.
    """

    mask_token: Float[Array, " size"]
    rate: float
    inference: bool

    def __init__(
        self,
        size: int,
        rate: float,
        inference: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `size`: number of channels of the vectors.
        - `rate`: probability in `[0, 1]` that a position is masked.
        - `inference`: default for `__call__`'s `inference`; flip it with
          `equinox.nn.inference_mode`.
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `key`: PRNG key for the initialisation of the mask token.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got rate={rate}")
        self.mask_token = _init(key, (size,), dtype)
        self.rate = rate
        self.inference = inference

    def __call__(
        self,
        x: Float[Array, "seq size"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq size"]:
        """**Arguments:**

        - `x`: sequence of shape `(seq, size)`.
        - `key`: PRNG key drawing which positions are masked; required unless the layer is
          the identity (`inference` or `rate == 0`).
        - `inference`: overrides the field of the same name.

        **Returns:**

        Array of shape `(seq, size)`.
        """
        if inference is None:
            inference = self.inference
        if inference or self.rate == 0:
            return x
        if key is None:
            raise ValueError(
                "TrainablePositionalMasking with inference=False and rate > 0 needs a key, "
                "got key=None"
            )
        masked = jax.random.bernoulli(key, self.rate, (x.shape[0],))
        return jnp.where(masked[:, None], self.mask_token.astype(x.dtype), x)

"""The position-wise two-layer MLP of Transformer and Perceiver blocks."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray


class FeedForward(eqx.Module):
    """`Linear(size, widening_factor * size) -> activation -> Linear(.., size)`, applied to
    every position independently.

    ```python
    ff = eqx_attention.FeedForward(64, widening_factor=4, key=jax.random.key(0))
    ff(jnp.ones((10, 64))).shape   # (10, 64)
    ```
    """

    hidden: eqx.nn.Linear
    output: eqx.nn.Linear
    activation: Callable[[Array], Array]

    def __init__(
        self,
        size: int,
        widening_factor: int = 1,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `size`: number of input and output channels.
        - `widening_factor`: the hidden layer has `widening_factor * size` channels.
        - `activation`: nonlinearity between the two layers; defaults to (tanh-approximated)
          GELU.
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `key`: PRNG key for the initialisation.
        """
        if widening_factor < 1:
            raise ValueError(f"widening_factor must be at least 1, got {widening_factor}")
        hidden_key, output_key = jax.random.split(key)
        hidden_size = widening_factor * size
        self.hidden = eqx.nn.Linear(size, hidden_size, dtype=dtype, key=hidden_key)
        self.output = eqx.nn.Linear(hidden_size, size, dtype=dtype, key=output_key)
        self.activation = activation

    def __call__(
        self, x: Float[Array, "*positions size"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*positions size"]:
        """**Arguments:**

        - `x`: one vector `(size,)` or any array of them, `(*positions, size)`.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        Array of the same shape as `x`.
        """

        def one(v):
            return self.output(self.activation(self.hidden(v)))

        flat = x.reshape(-1, x.shape[-1])
        return jax.vmap(one)(flat).reshape(x.shape)

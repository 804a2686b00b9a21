"""LSTM cell with `flax.linen.LSTMCell`'s equations and initialisation, and a scan over time."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

LSTMState = tuple[Float[Array, " hidden_size"], Float[Array, " hidden_size"]]


class LSTMCell(eqx.Module):
    r"""One step of a long short-term memory cell.

    With gates $i, f, o = \sigma(W x + U h + b)$ and candidate $g = \tanh(W x + U h + b)$
    (one $W, U, b$ per gate): $c' = f c + i g$ and $h' = o \tanh(c')$. The carry is
    `(c, h)` and the call signature `(carry, x) -> (carry, h)` is the one `jax.lax.scan`
    expects, as in `flax.linen.LSTMCell`; so is the initialisation (LeCun-normal input
    kernels, orthogonal recurrent kernels, zero biases).
    """

    input_kernel: Float[Array, "input_size 4 hidden_size"]
    recurrent_kernel: Float[Array, "hidden_size 4 hidden_size"]
    bias: Float[Array, "4 hidden_size"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, dtype: Any = None, *, key: PRNGKeyArray):
        """**Arguments:**

        - `input_size`: number of input channels.
        - `hidden_size`: number of channels of the hidden and cell states.
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `key`: PRNG key for the initialisation.
        """
        input_key, recurrent_key = jax.random.split(key)
        lecun = jax.nn.initializers.lecun_normal()
        orthogonal = jax.nn.initializers.orthogonal()

        def per_gate(init, k, fan_in):
            kernels = jax.vmap(lambda g: init(g, (fan_in, hidden_size), dtype))(
                jax.random.split(k, 4)
            )
            return jnp.transpose(kernels, (1, 0, 2))

        self.input_kernel = per_gate(lecun, input_key, input_size)
        self.recurrent_kernel = per_gate(orthogonal, recurrent_key, hidden_size)
        self.bias = jnp.zeros((4, hidden_size), dtype)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def initial_state(self) -> LSTMState:
        """The all-zero carry `(c, h)`."""
        zeros = jnp.zeros(self.hidden_size, self.bias.dtype)
        return zeros, zeros

    def __call__(
        self, carry: LSTMState, x: Float[Array, " input_size"], *, key: PRNGKeyArray | None = None
    ) -> tuple[LSTMState, Float[Array, " hidden_size"]]:
        """**Arguments:**

        - `carry`: `(c, h)`, each of shape `(hidden_size,)`.
        - `x`: input of shape `(input_size,)`.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        `((c', h'), h')`.
        """
        c, h = carry
        pre = jnp.einsum("i,igh->gh", x, self.input_kernel)
        pre = pre + jnp.einsum("i,igh->gh", h, self.recurrent_kernel) + self.bias
        i, f, g, o = pre
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h


class LSTM(eqx.Module):
    """An [`eqx_attention.LSTMCell`][] scanned over the time axis from a zero state; returns
    the hidden state after the last step.

    ```python
    lstm = eqx_attention.LSTM(8, 32, key=jax.random.key(0))
    lstm(jnp.ones((20, 8))).shape   # (32,)
    ```
    """

    cell: LSTMCell

    def __init__(self, input_size: int, hidden_size: int, dtype: Any = None, *, key: PRNGKeyArray):
        """**Arguments:**

        - `input_size`: number of input channels.
        - `hidden_size`: number of channels of the hidden and cell states.
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `key`: PRNG key for the initialisation.
        """
        self.cell = LSTMCell(input_size, hidden_size, dtype, key=key)

    def __call__(
        self, xs: Float[Array, "time input_size"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " hidden_size"]:
        """**Arguments:**

        - `xs`: input sequence of shape `(time, input_size)`.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        The last hidden state `h`, shape `(hidden_size,)`.
        """
        (_, h), _ = jax.lax.scan(
            lambda carry, x: self.cell(carry, x), self.cell.initial_state(), xs
        )
        return h

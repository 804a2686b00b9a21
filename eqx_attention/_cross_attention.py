"""flax-extra's attention layers as configurations of `MultiheadAttention`, and `attend`."""

from typing import Any, Literal

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from ._functional import MaskArray, dot_product_attention
from ._kernels import Implementation
from ._mha import MultiheadAttention

Weights = Float[Array, "num_heads q_seq kv_seq"]


def attend(
    query: Float[Array, "q_seq num_heads qk_size"],
    key_: Float[Array, "kv_seq num_heads qk_size"],
    value: Float[Array, "kv_seq num_heads v_size"],
    mask: MaskArray | None = None,
    *,
    dropout_p: float = 0.0,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> Float[Array, "q_seq num_heads*v_size"]:
    """Multi-head scaled dot-product attention with the heads concatenated, as flax-extra's
    `attend` (one example; `jax.vmap` over a batch).

    It is [`eqx_attention.dot_product_attention`][] followed by a reshape, so it runs on the
    fast core. A query row whose mask is all `False` outputs zeros.

    **Arguments:**

    - `query`: `(q_seq, num_heads, qk_size)`.
    - `key_`: `(kv_seq, num_heads, qk_size)`.
    - `value`: `(kv_seq, num_heads, v_size)`.
    - `mask`: optional boolean mask `(q_seq, kv_seq)` or `(num_heads, q_seq, kv_seq)`, any
      axis possibly 1 to broadcast, or a key-padding mask `(kv_seq,)`; `False` hides a pair.
      See [`eqx_attention.cross_attention_mask`][].
    - `dropout_p`: dropout probability on the attention weights.
    - `key`: PRNG key for dropout; required when `dropout_p > 0` and not `inference`. As
      in [`eqx_attention.MultiheadAttention`][] and Equinox, `key_` is the attention key
      and `key` the PRNG key. (Keyword only.)
    - `inference`: turn dropout off.

    **Returns:**

    Array of shape `(q_seq, num_heads * v_size)`.
    """
    if dropout_p > 0 and not inference and key is None:
        raise ValueError(
            f"attend(dropout_p={dropout_p}) needs a PRNG `key` when not in inference mode; "
            "pass key=... or inference=True"
        )
    out = dot_product_attention(
        query,
        key_,
        value,
        mask=mask,
        dropout_p=0.0 if inference else dropout_p,
        dropout_key=None if inference else key,
    )
    return out.reshape(out.shape[0], -1)


def _multihead(
    num_heads: int,
    query_size: int,
    kv_size: int,
    qk_channels: int,
    v_channels: int,
    output_size: int,
    use_bias: bool,
    dropout_p: float,
    inference: bool,
    dtype: Any,
    key: PRNGKeyArray,
) -> MultiheadAttention:
    """A `MultiheadAttention` from flax-extra's total (all-heads) widths."""
    for name, channels in (("qk_channels", qk_channels), ("v_channels", v_channels)):
        if channels % num_heads:
            raise ValueError(f"{name}={channels} is not divisible by num_heads={num_heads}")
    return MultiheadAttention(
        num_heads,
        query_size,
        key_size=kv_size,
        value_size=kv_size,
        output_size=output_size,
        qk_size=qk_channels // num_heads,
        vo_size=v_channels // num_heads,
        use_query_bias=use_bias,
        use_key_bias=use_bias,
        use_value_bias=use_bias,
        use_output_bias=use_bias,
        dropout_p=dropout_p,
        inference=inference,
        dtype=dtype,
        key=key,
    )


class CrossAttention(eqx.Module):
    """Multi-head attention from a query sequence to a key/value sequence, with flax-extra's
    and Perceiver IO's default widths.

    A thin configuration of [`eqx_attention.MultiheadAttention`][] (field `attention`);
    widths are totals over all heads, as in flax-extra and DeepMind's Perceiver:

    - `shape_for_attn="q"` (flax-extra's `QKVAttention`): queries and keys have
      `qk_channels = query_size` channels, values `v_channels = qk_channels`, and the output
      `v_channels`.
    - `shape_for_attn="kv"` (flax-extra's `KVQAttention`, the Perceiver encoder's
      latents-to-inputs attention): `qk_channels = kv_size`, `v_channels = qk_channels`, and
      the output has `query_size` channels, so it can be added back to the query.

    ```python
    attn = eqx_attention.CrossAttention(1, 64, 19, shape_for_attn="kv", key=jax.random.key(0))
    attn(jnp.ones((16, 64)), jnp.ones((100, 19))).shape   # (16, 64)
    ```
    """

    attention: MultiheadAttention

    def __init__(
        self,
        num_heads: int,
        query_size: int,
        kv_size: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        output_size: int | None = None,
        use_bias: bool = True,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype: Any = None,
        *,
        shape_for_attn: Literal["q", "kv"] = "q",
        key: PRNGKeyArray,
    ):
        """After the sizes, the positional arguments follow flax-extra's `Attention` (widths,
        `use_bias`, `dropout_rate`, `deterministic`); `shape_for_attn`, which picks between
        its `QKVAttention` and `KVQAttention`, is keyword only.

        **Arguments:**

        - `num_heads`: number of attention heads.
        - `query_size`: channels of the query input.
        - `kv_size`: channels of the key/value input.
        - `qk_channels`: total query/key width over all heads; defaults to `query_size`
          (`shape_for_attn="q"`) or `kv_size` (`"kv"`). Must divide by `num_heads`.
        - `v_channels`: total value width; defaults to `qk_channels`.
        - `output_size`: output channels; defaults to `v_channels` (`"q"`) or `query_size`
          (`"kv"`).
        - `use_bias`: biases on all four projections.
        - `dropout_p`: dropout probability on the attention weights.
        - `inference`: if `True`, no dropout (see `eqx.nn.inference_mode`).
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `shape_for_attn`: which input the default widths follow, `"q"` or `"kv"`. (Keyword
          only.)
        - `key`: PRNG key for the initialisation.
        """
        if qk_channels is None:
            qk_channels = query_size if shape_for_attn == "q" else kv_size
        if v_channels is None:
            v_channels = qk_channels
        if output_size is None:
            output_size = v_channels if shape_for_attn == "q" else query_size
        self.attention = _multihead(
            num_heads, query_size, kv_size, qk_channels, v_channels, output_size,
            use_bias, dropout_p, inference, dtype, key,
        )  # fmt: skip

    def __call__(
        self,
        query: Float[Array, "q_seq query_size"],
        kv: Float[Array, "kv_seq kv_size"],
        mask: MaskArray | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        implementation: Implementation | None = None,
        return_weights: bool = False,
    ) -> Float[Array, "q_seq output_size"] | tuple[Float[Array, "q_seq output_size"], Weights]:
        """**Arguments:**

        - `query`: `(q_seq, query_size)`.
        - `kv`: the sequence attended to, `(kv_seq, kv_size)`; it gives keys and values.
        - `mask`: optional boolean `(q_seq, kv_seq)` or `(num_heads, q_seq, kv_seq)`, any axis
          possibly 1 to broadcast, or `(kv_seq,)` (which, like `(1, kv_seq)`, hides padded
          inputs); `False` hides a pair, and a query that sees nothing gets the output
          projection of zeros.
        - `key`: PRNG key for dropout.
        - `inference`: overrides the module's `inference`.
        - `implementation`: forwarded to [`eqx_attention.dot_product_attention`][].
        - `return_weights`: also return the `(num_heads, q_seq, kv_seq)` attention weights.

        **Returns:**

        `(q_seq, output_size)`, or `(output, weights)` with `return_weights=True`.
        """
        return self.attention(
            query,
            kv,
            kv,
            mask,
            key=key,
            inference=inference,
            implementation=implementation,
            return_weights=return_weights,
        )


class SelfAttention(eqx.Module):
    """Multi-head self-attention with flax-extra's default widths: `qk_channels = size`,
    `v_channels = qk_channels`, output `v_channels`.

    A thin configuration of [`eqx_attention.MultiheadAttention`][] (field `attention`).

    ```python
    attn = eqx_attention.SelfAttention(8, 64, key=jax.random.key(0))
    attn(jnp.ones((16, 64))).shape   # (16, 64)
    ```
    """

    attention: MultiheadAttention

    def __init__(
        self,
        num_heads: int,
        size: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        output_size: int | None = None,
        use_bias: bool = True,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_heads`: number of attention heads.
        - `size`: channels of the input.
        - `qk_channels`: total query/key width; defaults to `size`.
        - `v_channels`: total value width; defaults to `qk_channels`.
        - `output_size`: output channels; defaults to `v_channels`.
        - `use_bias`, `dropout_p`, `inference`, `dtype`, `key`: as for
          [`eqx_attention.CrossAttention`][].
        """
        qk_channels = size if qk_channels is None else qk_channels
        v_channels = qk_channels if v_channels is None else v_channels
        output_size = v_channels if output_size is None else output_size
        self.attention = _multihead(
            num_heads, size, size, qk_channels, v_channels, output_size,
            use_bias, dropout_p, inference, dtype, key,
        )  # fmt: skip

    def __call__(
        self,
        x: Float[Array, "seq size"],
        mask: MaskArray | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        implementation: Implementation | None = None,
        return_weights: bool = False,
    ) -> Float[Array, "seq output_size"] | tuple[Float[Array, "seq output_size"], Weights]:
        """**Arguments:**

        - `x`: `(seq, size)`.
        - `mask`, `key`, `inference`, `implementation`, `return_weights`: as for
          [`eqx_attention.CrossAttention`][].

        **Returns:**

        `(seq, output_size)`, or `(output, weights)` with `return_weights=True`.
        """
        return self.attention(
            x,
            mask=mask,
            key=key,
            inference=inference,
            implementation=implementation,
            return_weights=return_weights,
        )


QKVAttention = CrossAttention
"""flax-extra's name for [`eqx_attention.CrossAttention`][] with `shape_for_attn="q"`."""


class KVQAttention(CrossAttention):
    """flax-extra's `KVQAttention`: a [`eqx_attention.CrossAttention`][] with
    `shape_for_attn="kv"` (widths follow the key/value input, the output follows the query).

    Takes the same arguments as `CrossAttention` apart from `shape_for_attn`.

    ```python
    attn = eqx_attention.KVQAttention(1, 64, 19, key=jax.random.key(0))
    attn(jnp.ones((16, 64)), jnp.ones((100, 19))).shape   # (16, 64)
    ```
    """

    def __init__(
        self,
        num_heads: int,
        query_size: int,
        kv_size: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        output_size: int | None = None,
        use_bias: bool = True,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:** as for [`eqx_attention.CrossAttention`][], without
        `shape_for_attn`."""
        super().__init__(
            num_heads, query_size, kv_size, qk_channels, v_channels, output_size, use_bias,
            dropout_p, inference, dtype, shape_for_attn="kv", key=key,
        )  # fmt: skip

"""Perceiver IO: a latent array cross-attends to the inputs, self-attends, and is queried by
the outputs."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._cross_attention import CrossAttention, SelfAttention
from ._feedforward import FeedForward
from ._masks import cross_attention_mask
from ._trainable import TrainablePositionalEncoding

Weights = Float[Array, "num_heads q_seq kv_seq"]


def _split(key: PRNGKeyArray | None, num: int) -> list[PRNGKeyArray | None]:
    return [None] * num if key is None else list(jax.random.split(key, num))


class CrossAttentionBlock(eqx.Module):
    """Pre-LayerNorm cross-attention block of Perceiver IO:

    `x = query + attention(norm(query), norm(kv))` (without `query +` when
    `use_query_residual=False`), then `x + mlp(norm(x))`.
    """

    query_norm: eqx.nn.LayerNorm
    kv_norm: eqx.nn.LayerNorm
    attention: CrossAttention
    mlp_norm: eqx.nn.LayerNorm
    mlp: FeedForward
    use_query_residual: bool = eqx.field(static=True)

    def __init__(
        self,
        num_heads: int,
        query_size: int,
        kv_size: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        shape_for_attn: Literal["q", "kv"] = "kv",
        use_query_residual: bool = True,
        widening_factor: int = 1,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_heads`: number of attention heads.
        - `query_size`: channels of the query sequence, and of the output.
        - `kv_size`: channels of the sequence attended to.
        - `qk_channels`, `v_channels`, `shape_for_attn`: attention widths, as for
          [`eqx_attention.CrossAttention`][] (the output always has `query_size` channels).
        - `use_query_residual`: add the query to the attention output.
        - `widening_factor`: hidden width of the MLP relative to `query_size`.
        - `dropout_p`: dropout probability on the attention weights.
        - `inference`: if `True`, no dropout.
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `key`: PRNG key for the initialisation.
        """
        attn_key, mlp_key = jax.random.split(key)
        self.query_norm = eqx.nn.LayerNorm(query_size, dtype=dtype)
        self.kv_norm = eqx.nn.LayerNorm(kv_size, dtype=dtype)
        self.attention = CrossAttention(
            num_heads,
            query_size,
            kv_size,
            qk_channels,
            v_channels,
            output_size=query_size,
            shape_for_attn=shape_for_attn,
            dropout_p=dropout_p,
            inference=inference,
            dtype=dtype,
            key=attn_key,
        )
        self.mlp_norm = eqx.nn.LayerNorm(query_size, dtype=dtype)
        self.mlp = FeedForward(query_size, widening_factor, dtype=dtype, key=mlp_key)
        self.use_query_residual = use_query_residual

    def __call__(
        self,
        query: Float[Array, "q_seq query_size"],
        kv: Float[Array, "kv_seq kv_size"],
        mask: Bool[Array, "q_seq kv_seq"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        return_weights: bool = False,
    ) -> Float[Array, "q_seq query_size"] | tuple[Float[Array, "q_seq query_size"], Weights]:
        """**Arguments:**

        - `query`: `(q_seq, query_size)`.
        - `kv`: `(kv_seq, kv_size)`.
        - `mask`: optional boolean `(q_seq, kv_seq)`; `False` hides a pair.
        - `key`: PRNG key for dropout.
        - `inference`: overrides the module's `inference`.
        - `return_weights`: also return the `(num_heads, q_seq, kv_seq)` attention weights.

        **Returns:**

        `(q_seq, query_size)`, or `(output, weights)` with `return_weights=True`.
        """
        attended = self.attention(
            jax.vmap(self.query_norm)(query),
            jax.vmap(self.kv_norm)(kv),
            mask,
            key=key,
            inference=inference,
            return_weights=return_weights,
        )
        attended, weights = attended if return_weights else (attended, None)
        x = query + attended if self.use_query_residual else attended
        x = x + self.mlp(jax.vmap(self.mlp_norm)(x))
        return (x, weights) if return_weights else x


class SelfAttentionBlock(eqx.Module):
    """Pre-LayerNorm Transformer block: `x + attention(norm(x))`, then `x + mlp(norm(x))`."""

    attention_norm: eqx.nn.LayerNorm
    attention: SelfAttention
    mlp_norm: eqx.nn.LayerNorm
    mlp: FeedForward

    def __init__(
        self,
        num_heads: int,
        size: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        widening_factor: int = 1,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_heads`: number of attention heads.
        - `size`: channels of the sequence.
        - `qk_channels`, `v_channels`: attention widths, as for
          [`eqx_attention.SelfAttention`][] (the output always has `size` channels).
        - `widening_factor`, `dropout_p`, `inference`, `dtype`, `key`: as for
          [`eqx_attention.CrossAttentionBlock`][].
        """
        attn_key, mlp_key = jax.random.split(key)
        self.attention_norm = eqx.nn.LayerNorm(size, dtype=dtype)
        self.attention = SelfAttention(
            num_heads,
            size,
            qk_channels,
            v_channels,
            output_size=size,
            dropout_p=dropout_p,
            inference=inference,
            dtype=dtype,
            key=attn_key,
        )
        self.mlp_norm = eqx.nn.LayerNorm(size, dtype=dtype)
        self.mlp = FeedForward(size, widening_factor, dtype=dtype, key=mlp_key)

    def __call__(
        self,
        x: Float[Array, "seq size"],
        mask: Bool[Array, "seq seq"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq size"]:
        """**Arguments:**

        - `x`: `(seq, size)`.
        - `mask`: optional boolean `(seq, seq)`; `False` hides a pair.
        - `key`: PRNG key for dropout.
        - `inference`: overrides the module's `inference`.

        **Returns:**

        Array of shape `(seq, size)`.
        """
        normed = jax.vmap(self.attention_norm)(x)
        x = x + self.attention(normed, mask, key=key, inference=inference)
        return x + self.mlp(jax.vmap(self.mlp_norm)(x))


class PerceiverEncoder(eqx.Module):
    """The Perceiver IO encoder: a learned latent array cross-attends once to the inputs,
    then goes `num_blocks` times through a stack of `num_self_attends_per_block`
    self-attention blocks whose weights are shared across the repeats.

    The cross-attention runs on [`eqx_attention.dot_product_attention`][], so its cost and
    memory are linear in the number of inputs; inputs hidden by `input_mask` never change
    the result.

    ```python
    encoder = eqx_attention.PerceiverEncoder(19, num_latents=32, latent_size=64,
                                             key=jax.random.key(0))
    latents = encoder(jnp.ones((1000, 19)))   # (32, 64)
    ```
    """

    latents: TrainablePositionalEncoding
    cross_attend: CrossAttentionBlock
    self_attends: SelfAttentionBlock
    num_blocks: int = eqx.field(static=True)
    num_self_attends_per_block: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        num_latents: int,
        latent_size: int,
        num_blocks: int = 1,
        num_self_attends_per_block: int = 2,
        num_cross_heads: int = 1,
        num_self_heads: int = 8,
        cross_qk_channels: int | None = None,
        cross_v_channels: int | None = None,
        cross_widening_factor: int = 1,
        self_widening_factor: int = 1,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `input_size`: channels of each input element.
        - `num_latents`, `latent_size`: shape of the latent array.
        - `num_blocks`: how many times the self-attention stack is applied (shared weights).
        - `num_self_attends_per_block`: self-attention blocks in the stack.
        - `num_cross_heads`, `num_self_heads`: heads of the cross- and self-attention.
        - `cross_qk_channels`, `cross_v_channels`: widths of the cross-attention; by default
          they follow the inputs (`shape_for_attn="kv"`), as in Perceiver IO.
        - `cross_widening_factor`, `self_widening_factor`: MLP widening factors.
        - `dropout_p`: dropout probability on all attention weights.
        - `inference`: if `True`, no dropout.
        - `dtype`: parameter dtype; defaults to the default float dtype.
        - `key`: PRNG key for the initialisation.
        """
        if num_blocks < 1 or num_self_attends_per_block < 1:
            raise ValueError(
                "num_blocks and num_self_attends_per_block must be at least 1, got "
                f"num_blocks={num_blocks}, num_self_attends_per_block={num_self_attends_per_block}"
            )
        latent_key, cross_key, self_key = jax.random.split(key, 3)
        self.latents = TrainablePositionalEncoding(num_latents, latent_size, dtype, key=latent_key)
        self.cross_attend = CrossAttentionBlock(
            num_cross_heads,
            latent_size,
            input_size,
            cross_qk_channels,
            cross_v_channels,
            shape_for_attn="kv",
            widening_factor=cross_widening_factor,
            dropout_p=dropout_p,
            inference=inference,
            dtype=dtype,
            key=cross_key,
        )

        # One stacked module (leading axis = layer) so the stack runs as a scan.
        def make_block(k):
            return SelfAttentionBlock(
                num_self_heads,
                latent_size,
                widening_factor=self_widening_factor,
                dropout_p=dropout_p,
                inference=inference,
                dtype=dtype,
                key=k,
            )

        self.self_attends = eqx.filter_vmap(make_block)(
            jax.random.split(self_key, num_self_attends_per_block)
        )
        self.num_blocks = num_blocks
        self.num_self_attends_per_block = num_self_attends_per_block

    def __call__(
        self,
        inputs: Float[Array, "seq input_size"],
        input_mask: Bool[Array, " seq"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        return_weights: bool = False,
    ) -> (
        Float[Array, "num_latents latent_size"]
        | tuple[Float[Array, "num_latents latent_size"], Weights]
    ):
        """**Arguments:**

        - `inputs`: `(seq, input_size)`.
        - `input_mask`: optional boolean `(seq,)`, `False` at padding; padded inputs are
          never attended to.
        - `key`: PRNG key for dropout.
        - `inference`: overrides the modules' `inference`.
        - `return_weights`: also return the cross-attention weights
          `(num_cross_heads, num_latents, seq)`.

        **Returns:**

        The latents, `(num_latents, latent_size)`, or `(latents, weights)`.
        """
        cross_key, self_key = _split(key, 2)
        latents = self.latents()
        mask = None
        if input_mask is not None:
            mask = cross_attention_mask(jnp.ones(latents.shape[0], bool), input_mask)
        x = self.cross_attend(
            latents, inputs, mask, key=cross_key, inference=inference, return_weights=return_weights
        )
        x, weights = x if return_weights else (x, None)
        x = self._self_attend(x, self_key, inference)
        return (x, weights) if return_weights else x

    def _self_attend(self, x: Array, key: PRNGKeyArray | None, inference: bool | None) -> Array:
        params, static = eqx.partition(self.self_attends, eqx.is_array)
        shape = (self.num_blocks, self.num_self_attends_per_block)
        keys = None if key is None else jax.random.split(key, shape)

        def layer(x, params_and_key):
            layer_params, layer_key = params_and_key
            block = eqx.combine(layer_params, static)
            return block(x, key=layer_key, inference=inference), None

        def repeat(x, repeat_keys):
            return jax.lax.scan(layer, x, (params, repeat_keys))[0], None

        return jax.lax.scan(repeat, x, keys, length=self.num_blocks)[0]


class PerceiverDecoder(eqx.Module):
    """The Perceiver IO decoder: output queries cross-attend to the latents, then a linear
    layer maps each to `output_size` channels.

    The queries come from `output_queries` (e.g. a [`eqx_attention.FourierPositionEncoding`][]
    of the output grid, or a [`eqx_attention.TrainablePositionalEncoding`][] with one query
    for classification). Every output position is decoded independently, so a subset of
    positions gives exactly the matching rows of the full output, and large outputs can be
    decoded in chunks of `chunk_size` queries at a time.
    """

    output_queries: Callable[[Int[Array, " n"] | None], Array]
    cross_attend: CrossAttentionBlock
    output: eqx.nn.Linear

    def __init__(
        self,
        output_queries: Callable[[Int[Array, " n"] | None], Array],
        latent_size: int,
        output_size: int,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        widening_factor: int = 1,
        use_query_residual: bool = False,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `output_queries`: module called with optional positions, returning the
          `(n, query_size)` queries of those output positions.
        - `latent_size`: channels of the latents.
        - `output_size`: channels of each decoded output.
        - `num_heads`, `qk_channels`, `v_channels`: cross-attention configuration (widths
          follow the latents by default, `shape_for_attn="kv"`).
        - `widening_factor`: MLP widening factor.
        - `use_query_residual`: add the queries to the attention output.
        - `dropout_p`, `inference`, `dtype`: as for [`eqx_attention.PerceiverEncoder`][].
        - `key`: PRNG key for the initialisation.
        """
        self.output_queries = output_queries
        query_size = jax.eval_shape(output_queries).shape[-1]
        attn_key, out_key = jax.random.split(key)
        self.cross_attend = CrossAttentionBlock(
            num_heads,
            query_size,
            latent_size,
            qk_channels,
            v_channels,
            shape_for_attn="kv",
            use_query_residual=use_query_residual,
            widening_factor=widening_factor,
            dropout_p=dropout_p,
            inference=inference,
            dtype=dtype,
            key=attn_key,
        )
        self.output = eqx.nn.Linear(query_size, output_size, dtype=dtype, key=out_key)

    def __call__(
        self,
        latents: Float[Array, "num_latents latent_size"],
        positions: Int[Array, " n"] | None = None,
        *,
        chunk_size: int | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "n output_size"]:
        """**Arguments:**

        - `latents`: `(num_latents, latent_size)`.
        - `positions`: optional indices of the output positions to decode; defaults to all
          positions of `output_queries`.
        - `chunk_size`: decode at most this many positions at a time (sequentially), so
          memory for queries and intermediate activations is bounded by the chunk.
        - `key`: PRNG key for dropout.
        - `inference`: overrides the modules' `inference`.

        **Returns:**

        Array of shape `(n, output_size)`.
        """
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got chunk_size={chunk_size}")
        if positions is None:
            positions = jnp.arange(jax.eval_shape(self.output_queries).shape[0])
        n = positions.shape[0]
        if chunk_size is None or chunk_size >= n:
            return self._decode(latents, positions, key, inference)
        num_chunks = -(-n // chunk_size)
        # Pad with a valid position; the surplus rows are decoded and dropped.
        chunks = jnp.pad(positions, (0, num_chunks * chunk_size - n)).reshape(num_chunks, -1)
        keys = None if key is None else jax.random.split(key, num_chunks)
        out = jax.lax.map(lambda args: self._decode(latents, *args, inference), (chunks, keys))
        return out.reshape(num_chunks * chunk_size, -1)[:n]

    def _decode(
        self,
        latents: Array,
        positions: Array,
        key: PRNGKeyArray | None,
        inference: bool | None,
    ) -> Array:
        queries = self.output_queries(positions)
        x = self.cross_attend(queries, latents, key=key, inference=inference)
        return jax.vmap(self.output)(x)


class PerceiverIO(eqx.Module):
    """Perceiver IO: optional input encoding, then [`eqx_attention.PerceiverEncoder`][], then
    [`eqx_attention.PerceiverDecoder`][].

    ```python
    import eqx_attention as ea

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    pixels = ea.Encoding(positional_encoding=ea.FourierPositionEncoding((8, 8), num_bands=4))
    encoder = ea.PerceiverEncoder(19, num_latents=16, latent_size=64, key=k1)
    decoder = ea.PerceiverDecoder(ea.TrainablePositionalEncoding(1, 64, key=k2), 64, 10, key=k3)
    model = ea.PerceiverIO(encoder, decoder, pixels)
    logits = model(jnp.ones((8, 8, 1)))[0]   # (10,)
    ```
    """

    encoder: PerceiverEncoder
    decoder: PerceiverDecoder
    input_encoding: Callable[[Array], Array] | None

    def __init__(
        self,
        encoder: PerceiverEncoder,
        decoder: PerceiverDecoder,
        input_encoding: Callable[[Array], Array] | None = None,
    ):
        """**Arguments:**

        - `encoder`: the encoder.
        - `decoder`: the decoder; its `latent_size` must be the encoder's.
        - `input_encoding`: optional module turning a raw input into the `(seq, input_size)`
          sequence the encoder takes, e.g. an [`eqx_attention.Encoding`][].
        """
        self.encoder = encoder
        self.decoder = decoder
        self.input_encoding = input_encoding

    def __call__(
        self,
        inputs: Array,
        input_mask: Bool[Array, " seq"] | None = None,
        output_positions: Int[Array, " n"] | None = None,
        *,
        chunk_size: int | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "n output_size"]:
        """**Arguments:**

        - `inputs`: one example; `(seq, input_size)` unless `input_encoding` makes it so.
        - `input_mask`: optional boolean `(seq,)`, `False` at padded inputs.
        - `output_positions`, `chunk_size`: as for [`eqx_attention.PerceiverDecoder`][].
        - `key`: PRNG key for dropout.
        - `inference`: overrides the modules' `inference`.

        **Returns:**

        Array of shape `(n, output_size)`.
        """
        encoder_key, decoder_key = _split(key, 2)
        x = inputs if self.input_encoding is None else self.input_encoding(inputs)
        latents = self.encoder(x, input_mask, key=encoder_key, inference=inference)
        return self.decoder(
            latents, output_positions, chunk_size=chunk_size, key=decoder_key, inference=inference
        )

"""`MultiheadAttention`: Equinox's module on the fast core, with GQA, RoPE and KV caches."""

import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Inexact, Int, PRNGKeyArray

from ._cache import Cache, KVCache, SlidingWindowKVCache
from ._convert import from_equinox, from_flax_nnx
from ._functional import (
    BiasArray,
    MaskArray,
    dot_product_attention,
    dot_product_attention_weights,
)
from ._kernels import BlockPlan, Implementation
from ._positional import RotaryPositionalEmbedding
from ._spec import MaskMod, ScoreMod, Window, query_positions
from ._typing import ArrayOrNumPy

ProcessHeads = Callable[
    [
        Float[Array, "seq num_heads qk_size"],
        Float[Array, "kv_seq num_kv_heads qk_size"],
        Float[Array, "kv_seq num_kv_heads vo_size"],
    ],
    tuple[
        Float[Array, "seq num_heads qk_size"],
        Float[Array, "kv_seq num_kv_heads qk_size"],
        Float[Array, "kv_seq num_kv_heads vo_size"],
    ],
]
Output = Float[Array, "q_seq output_size"]
Weights = Float[Array, "num_heads q_seq kv_seq"]

# LayerNorm epsilon of the QK normalisation: flax's default, so converted nnx modules agree.
_QK_NORM_EPS = 1e-6


class MultiheadAttention(eqx.Module):
    r"""Multi-head attention, a superset of `equinox.nn.MultiheadAttention`.

    $$\text{MultiheadAttention}(Q, K, V) = \sum_i
    \text{Attention}(QW^Q_i, KW^K_i, VW^V_i)W^O_i$$

    with the same fields, parameter layout and defaults as Equinox (so
    [`eqx_attention.MultiheadAttention.from_equinox`][] converts exactly), running on
    [`eqx_attention.dot_product_attention`][], and adding:

    - grouped-query / multi-query attention (`num_kv_heads`);
    - `is_causal`, `local_window_size` and an additive `bias`, forwarded to the core so the
      O(seq)-memory implementation skips masked blocks;
    - QK normalisation (`normalize_qk`) and rotary embeddings (`rope`);
    - learned attention sinks, one logit per head (`use_sinks`);
    - KV-cache decoding: `out, cache = mha(x, cache=cache)`;
    - `return_weights=True` for inspecting the attention probabilities;
    - mixed precision: parameters in `dtype`, computation in `compute_dtype`;
    - FlexAttention-style `mask_mod` and `score_mod`.

    Like every Equinox layer it acts on one example; `jax.vmap` it over a batch.

    ```python
    mha = eqx_attention.MultiheadAttention(8, 512, num_kv_heads=2,
                                           rope=eqx_attention.RotaryPositionalEmbedding(64),
                                           key=jax.random.key(0))
    x = jnp.ones((128, 512))
    y = mha(x, is_causal=True)  # self-attention: key_ and value default to query

    cache = mha.init_cache(max_length=256)
    y, cache = mha(x, cache=cache)  # prefill
    y1, cache = mha(x[:1], cache=cache)  # one more token, at position 128
    ```
    """

    query_proj: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value_proj: eqx.nn.Linear
    output_proj: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    query_norm: eqx.nn.LayerNorm | None
    key_norm: eqx.nn.LayerNorm | None
    rope: RotaryPositionalEmbedding | None
    sinks: Float[Array, " num_heads"] | None

    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    query_size: int = eqx.field(static=True)
    key_size: int = eqx.field(static=True)
    value_size: int = eqx.field(static=True)
    output_size: int = eqx.field(static=True)
    qk_size: int = eqx.field(static=True)
    vo_size: int = eqx.field(static=True)
    use_query_bias: bool = eqx.field(static=True)
    use_key_bias: bool = eqx.field(static=True)
    use_value_bias: bool = eqx.field(static=True)
    use_output_bias: bool = eqx.field(static=True)
    normalize_qk: bool = eqx.field(static=True)
    use_sinks: bool = eqx.field(static=True)
    compute_dtype: Any = eqx.field(static=True)

    def __init__(
        self,
        num_heads: int,
        query_size: int,
        key_size: int | None = None,
        value_size: int | None = None,
        output_size: int | None = None,
        qk_size: int | None = None,
        vo_size: int | None = None,
        use_query_bias: bool = False,
        use_key_bias: bool = False,
        use_value_bias: bool = False,
        use_output_bias: bool = False,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype: Any = None,
        *,
        num_kv_heads: int | None = None,
        normalize_qk: bool = False,
        rope: RotaryPositionalEmbedding | None = None,
        use_sinks: bool = False,
        compute_dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """The arguments up to `dtype` are Equinox's, in Equinox's order, so a positional
        call written for `equinox.nn.MultiheadAttention` means the same here; the others are
        keyword only.

        **Arguments:**

        - `num_heads`: number of query heads.
        - `query_size`: channels of the query input.
        - `key_size`, `value_size`: channels of the key and value inputs; default to
          `query_size`.
        - `output_size`: channels of the output; defaults to `query_size`.
        - `qk_size`, `vo_size`: per-head size of queries/keys and of values; default to
          `query_size // num_heads` (which must then divide exactly).
        - `use_query_bias`, `use_key_bias`, `use_value_bias`, `use_output_bias`: whether
          each projection has a bias.
        - `dropout_p`: dropout probability on the attention weights. It lives in the
          `dropout` field (an `eqx.nn.Dropout`), where it may be replaced with
          `eqx.tree_at(lambda m: m.dropout.p, mha, rate)`; an array rate changes without
          recompiling a jitted caller.
        - `inference`: if `True`, dropout is off; toggled by `eqx.nn.inference_mode`
          (through the `dropout` field) or per call.
        - `dtype`: parameter dtype; defaults to float32 (float64 in 64-bit mode).
        - `num_kv_heads`: number of key/value heads; defaults to `num_heads`. A divisor of
          `num_heads` gives grouped-query attention, `1` multi-query attention. (Keyword
          only.)
        - `normalize_qk`: normalise each query and key head with a LayerNorm over `qk_size`
          (learned scale shared by the heads, no bias, epsilon `1e-6`) before the dot
          product, as ViT-22B and `flax.nnx.MultiHeadAttention(normalize_qk=True)` do.
          (Keyword only.)
        - `rope`: optional [`eqx_attention.RotaryPositionalEmbedding`][] of size `qk_size`,
          applied to every query and key head at its absolute position (after the QK
          normalisation). Keys sit at positions `0..kv_seq - 1` and queries at
          `kv_seq - q_seq + i`, the alignment `is_causal` uses; with a cache, at the
          positions of the tokens in the sequence. (Keyword only.)
        - `use_sinks`: learn one attention-sink logit per query head (the `sinks` field,
          `(num_heads,)`), which joins the softmax's normaliser as a key with a zero value
          (see `sinks` in [`eqx_attention.dot_product_attention`][]). Initialised from
          `normal(0, 0.02)`, as the Hugging Face implementation of gpt-oss does (its
          `initializer_range`). (Keyword only.)
        - `compute_dtype`: the dtype the layer computes in, for mixed precision (float32
          parameters, bfloat16 computation, say). The parameters stay in `dtype` (so do
          their gradients); each call casts them, and the inputs, to `compute_dtype`, so
          the projections, the heads, attention and the output are in `compute_dtype`, and
          so is the default cache of [`eqx_attention.MultiheadAttention.init_cache`][].
          Defaults to `None`: no cast, the inputs and parameters promote as usual. Named
          `compute_dtype` because `dtype` is Equinox's parameter dtype (Flax's `dtype` and
          `param_dtype` are `compute_dtype` and `dtype` here). (Keyword only.)
        - `key`: PRNG key for the initialisation. (Keyword only.)
        """
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
            )
        if (qk_size is None or vo_size is None) and query_size % num_heads:
            raise ValueError(
                f"query_size={query_size} is not divisible by num_heads={num_heads}; pass "
                "qk_size and vo_size explicitly"
            )
        key_size = query_size if key_size is None else key_size
        value_size = query_size if value_size is None else value_size
        output_size = query_size if output_size is None else output_size
        qk_size = query_size // num_heads if qk_size is None else qk_size
        vo_size = query_size // num_heads if vo_size is None else vo_size
        if compute_dtype is not None:
            compute_dtype = jnp.dtype(compute_dtype)
            if not jnp.issubdtype(compute_dtype, jnp.floating):
                raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
        if rope is not None and rope.embedding_size != qk_size:
            raise ValueError(
                f"rope.embedding_size={rope.embedding_size} must equal qk_size={qk_size}"
            )
        qkey, kkey, vkey, okey = jax.random.split(key, 4)

        self.query_proj = eqx.nn.Linear(
            query_size, num_heads * qk_size, use_bias=use_query_bias, dtype=dtype, key=qkey
        )
        self.key_proj = eqx.nn.Linear(
            key_size, num_kv_heads * qk_size, use_bias=use_key_bias, dtype=dtype, key=kkey
        )
        self.value_proj = eqx.nn.Linear(
            value_size, num_kv_heads * vo_size, use_bias=use_value_bias, dtype=dtype, key=vkey
        )
        self.output_proj = eqx.nn.Linear(
            num_heads * vo_size, output_size, use_bias=use_output_bias, dtype=dtype, key=okey
        )
        self.dropout = eqx.nn.Dropout(dropout_p, inference=inference)
        if normalize_qk:
            self.query_norm = eqx.nn.LayerNorm(
                qk_size, eps=_QK_NORM_EPS, use_bias=False, dtype=dtype
            )
            self.key_norm = eqx.nn.LayerNorm(qk_size, eps=_QK_NORM_EPS, use_bias=False, dtype=dtype)
        else:
            self.query_norm = self.key_norm = None
        self.rope = rope
        # Folded in rather than split off, so adding sinks leaves the projections' draws as
        # they were for the same key.
        sink_key = jax.random.fold_in(key, 4)
        sink_dtype = self.query_proj.weight.dtype
        self.sinks = (
            0.02 * jax.random.normal(sink_key, (num_heads,), sink_dtype) if use_sinks else None
        )

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.query_size = query_size
        self.key_size = key_size
        self.value_size = value_size
        self.output_size = output_size
        self.qk_size = qk_size
        self.vo_size = vo_size
        self.use_query_bias = use_query_bias
        self.use_key_bias = use_key_bias
        self.use_value_bias = use_value_bias
        self.use_output_bias = use_output_bias
        self.normalize_qk = normalize_qk
        self.use_sinks = use_sinks
        self.compute_dtype = compute_dtype

    @jax.named_scope("eqx_attention.MultiheadAttention")
    def __call__(
        self,
        query: Inexact[ArrayOrNumPy, "q_seq q_size"],
        key_: Inexact[ArrayOrNumPy, "kv_seq k_size"] | None = None,
        value: Inexact[ArrayOrNumPy, "kv_seq v_size"] | None = None,
        mask: MaskArray | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        deterministic: bool | None = None,
        process_heads: ProcessHeads | None = None,
        bias: BiasArray | None = None,
        is_causal: bool = False,
        local_window_size: int | tuple[int, int] | None = None,
        cache: Cache | None = None,
        implementation: Implementation | None = None,
        return_weights: bool = False,
        mask_mod: MaskMod | None = None,
        score_mod: ScoreMod | None = None,
        block_plan: BlockPlan | None = None,
    ) -> Output | tuple[Output, Cache] | tuple[Output, Weights] | tuple[Output, Weights, Cache]:
        """The arguments Equinox has come first, in its order; the others are keyword only.

        **Arguments:**

        - `query`: `(q_seq, query_size)`.
        - `key_`: `(kv_seq, key_size)`; defaults to `query` (self-attention).
        - `value`: `(kv_seq, value_size)`; defaults to `key_`.
        - `mask`: optional boolean mask, `(q_seq, kv_seq)` or `(num_heads, q_seq, kv_seq)`,
          where any axis may have size 1 to broadcast, or a key-padding mask `(kv_seq,)`;
          `False` hides a pair. With a `KVCache`, `kv_seq` is the cache's `max_length`
          (slot `p` holds position `p`).
        - `key`: PRNG key for dropout. (Keyword only, as in Equinox.)
        - `inference`: overrides the module's `inference` for this call.
        - `deterministic`: deprecated in favour of `inference`, with Equinox's warning.
        - `process_heads`: Equinox's hook, `process_heads(q, k, v) -> (q, k, v)` on the
          `(seq, heads, size)` heads after QK normalisation and RoPE; `k` and `v` have
          `num_kv_heads` heads. With a cache it sees only the new tokens.
        - `bias`: optional float bias added to the logits, same shapes as `mask`.
        - `is_causal`: causal attention, bottom-right aligned (query row `i` sits at key
          position `kv_seq - q_seq + i`). Implied by `cache`.
        - `local_window_size`: `w` or `(left, right)`: a query at position `p` sees keys in
          `[p - left, p + right]`.
        - `cache`: a [`eqx_attention.KVCache`][] or [`eqx_attention.SlidingWindowKVCache`][]
          of earlier tokens. `query` then holds the next `q_seq` tokens (a prefill or a
          single step); `key_`/`value` must be left out; attention is causal over cached and
          new tokens and RoPE uses their absolute positions.
        - `implementation`: forwarded to [`eqx_attention.dot_product_attention`][].
        - `return_weights`: also return the attention probabilities (computed separately
          from the output, which is unchanged; dropout is not applied to them).
        - `mask_mod`: as in [`eqx_attention.dot_product_attention`][] (e.g.
          [`eqx_attention.document_mask_mod`][] for packed documents); its blocks are skipped.
          With a cache it sees the tokens' absolute positions.
        - `score_mod`: as in [`eqx_attention.dot_product_attention`][],
          `score_mod(score, head, q_pos, kv_pos) -> score` on the scaled logits: `head` is the
          query head, `0..num_heads - 1` (with grouped-query attention, query head `n` reads
          key/value head `n // (num_heads // num_kv_heads)`), and the positions are the ones
          `is_causal` and RoPE use (absolute token positions with a cache). A learned
          relative-position bias is a closure over its table, which gets gradients.
        - `block_plan`: a [`eqx_attention.BlockPlan`][] from
          [`eqx_attention.make_block_plan`][] with the same `mask`, `is_causal`,
          `local_window_size` and `mask_mod`, shared by the layers of a model instead of
          being rebuilt in each. Not with a cache, whose blocks change with every write.

        Complex inputs are refused with a `ValueError`. The inputs and the masks may also be
        NumPy arrays. With a `compute_dtype` the inputs are cast to it and the output is in
        it; the weights of `return_weights` are float32, as from
        [`eqx_attention.dot_product_attention_weights`][].

        **Returns:**

        The output, `(q_seq, output_size)`; with `return_weights=True` the tuple
        `(output, weights)` with weights `(num_heads, q_seq, kv_seq)`; with a cache the
        updated cache is appended: `(output, cache)` or `(output, weights, cache)`.
        """
        if deterministic is not None:
            inference = deterministic
            warnings.warn(
                "MultiheadAttention()(deterministic=...) is deprecated "
                "in favour of MultiheadAttention()(inference=...)",
                stacklevel=2,
            )
        if cache is not None and (key_ is not None or value is not None):
            raise ValueError("with a cache, key_ and value must be None (self-attention)")
        if cache is not None and block_plan is not None:
            raise ValueError(
                "block_plan is not supported with a cache: the blocks to visit change with "
                "every write, and are found in each call"
            )
        key_ = query if key_ is None else key_
        value = key_ if value is None else value
        query, key_, value, mask, bias = (
            None if x is None else jnp.asarray(x) for x in (query, key_, value, mask, bias)
        )
        self._check_inputs(query, key_, value)
        if self.compute_dtype is not None:
            query, key_, value = (x.astype(self.compute_dtype) for x in (query, key_, value))
        # The parameters as this call uses them: in `compute_dtype`, if any.
        layer = self._cast_parameters()
        q_seq = query.shape[0]
        window = _normalise_window(local_window_size)
        if cache is None:
            # Keys at 0..kv_seq - 1, queries bottom-right aligned with them.
            q_positions = query_positions(q_seq, key_.shape[0])
            k_positions = jnp.arange(key_.shape[0], dtype=jnp.int32)
        else:
            cache.check_call(mask, bias, window)
            self._check_cache(cache)
            # The new tokens continue the cached ones.
            q_positions = k_positions = query_positions(q_seq, q_seq, cache.length)
        q, k, v = layer._heads(query, key_, value, q_positions, k_positions, process_heads)
        placement = {}
        if cache is not None:
            # Causal attention over absolute positions: the queries follow the cached tokens.
            k, v, placement, cache = cache.update(k, v)
            is_causal = True
        self._check_mask(mask, bias, q_seq, k.shape[0])

        # What the output and the weights share, so the two cannot disagree.
        spec = dict(
            is_causal=is_causal,
            local_window_size=window,
            mask_mod=mask_mod,
            score_mod=score_mod,
            sinks=layer.sinks,
            **placement,
        )
        dropout_p, dropout_key = self._dropout_args(key, inference)
        attn = dot_product_attention(
            q,
            k,
            v,
            bias,
            mask,
            **spec,
            dropout_p=dropout_p,
            dropout_key=dropout_key,
            implementation=implementation,
            block_plan=block_plan,
        )
        if self.compute_dtype is not None:
            # A cache of another dtype promotes the attention; the output is in compute_dtype.
            attn = attn.astype(self.compute_dtype)
        out = jax.vmap(layer.output_proj)(attn.reshape(q_seq, self.num_heads * self.vo_size))
        # `return_weights` stays a flag rather than a method: the weights need the very heads
        # and cache contents of this call (after process_heads and the cache write), which a
        # separate method would have to recompute, and write to the cache a second time.
        result: tuple = (out,)
        if return_weights:
            weights = dot_product_attention_weights(q, k, bias, mask, **spec)
            result += (weights,)
        if cache is not None:
            result += (cache,)
        return result[0] if len(result) == 1 else result

    def _heads(
        self,
        query: Inexact[Array, "q_seq q_size"],
        key_: Inexact[Array, "kv_seq k_size"],
        value: Inexact[Array, "kv_seq v_size"],
        q_positions: Int[Array, " q_seq"],
        k_positions: Int[Array, " kv_seq"],
        process_heads: ProcessHeads | None = None,
    ) -> tuple[
        Float[Array, "q_seq num_heads qk_size"],
        Float[Array, "kv_seq num_kv_heads qk_size"],
        Float[Array, "kv_seq num_kv_heads vo_size"],
    ]:
        """Inputs to attention heads: project, normalise (QK norm), rotate (RoPE) at the
        given absolute positions, then Equinox's `process_heads` hook.

        **Returns:**

        `(q, k, v)` of shapes `(q_seq, num_heads, qk_size)`, `(kv_seq, num_kv_heads,
        qk_size)` and `(kv_seq, num_kv_heads, vo_size)`.
        """
        q = _project(self.query_proj, query, self.num_heads)
        k = _project(self.key_proj, key_, self.num_kv_heads)
        v = _project(self.value_proj, value, self.num_kv_heads)
        if self.query_norm is not None and self.key_norm is not None:
            q = jax.vmap(jax.vmap(self.query_norm))(q)
            k = jax.vmap(jax.vmap(self.key_norm))(k)
        if self.rope is not None:
            q = _rotate(self.rope, q, q_positions)
            k = _rotate(self.rope, k, k_positions)
        if process_heads is not None:
            shapes = (q.shape, k.shape, v.shape)
            q, k, v = process_heads(q, k, v)
            if (q.shape, k.shape, v.shape) != shapes:
                raise ValueError(
                    "process_heads must not change the shapes of the heads: expected "
                    f"{shapes}, got {(q.shape, k.shape, v.shape)}"
                )
        return q, k, v

    def init_cache(self, max_length: int, dtype: Any = None) -> KVCache:
        """An empty [`eqx_attention.KVCache`][] for up to `max_length` tokens.

        **Arguments:**

        - `max_length`: number of tokens the cache can hold (prompt and generated).
        - `dtype`: dtype of the cached keys and values; defaults to `compute_dtype`, or to
          the parameters' dtype without one.

        **Returns:**

        A `KVCache` for one example; `jax.vmap` this method for a batch.
        """
        return KVCache.empty(max_length, *self._cache_shape(), self._cache_dtype(dtype))

    def init_sliding_window_cache(self, window: int, dtype: Any = None) -> SlidingWindowKVCache:
        """An empty ring-buffer [`eqx_attention.SlidingWindowKVCache`][] of `window` tokens.

        Use it with calls passing `local_window_size=window` (or `(left, right)` with
        `left <= window`): its memory is the window, and decoding may go on for ever.

        **Returns:**

        A `SlidingWindowKVCache` for one example.
        """
        return SlidingWindowKVCache.empty(window, *self._cache_shape(), self._cache_dtype(dtype))

    @classmethod
    def from_equinox(cls, module: eqx.nn.MultiheadAttention) -> "MultiheadAttention":
        """Convert an `equinox.nn.MultiheadAttention`, sharing its parameters.

        The projections and dropout are the same objects, so outputs agree with the Equinox
        module up to float rounding (the logits are computed in a different order), except
        for query rows that may attend to nothing: Equinox returns the mean of all values
        there, this module zeros.
        """
        return from_equinox(cls, module)

    @classmethod
    def from_flax_nnx(cls, module: Any) -> "MultiheadAttention":
        """Convert a `flax.nnx.MultiHeadAttention` (copying its parameters).

        Flax's `LinearGeneral` kernels are `(in, heads, head_dim)` for the query/key/value
        projections and `(heads, head_dim, out)` for the output; they become Equinox-layout
        `(out, in)` weights by flattening the head axes (head-major, as here) and
        transposing. QK normalisation converts to this module's LayerNorm (same epsilon,
        scale only). Flax's decoding cache is not converted: use
        [`eqx_attention.MultiheadAttention.init_cache`][].

        Flax's `param_dtype` becomes the parameters' `dtype` and its computation `dtype`
        this module's `compute_dtype` (`None` stays `None`: both promote the inputs with the
        parameters), so a float32-parameter, bfloat16-computation module converts as it is.

        One Flax setting cannot be reproduced and raises a `ValueError`:
        `broadcast_dropout=True` (Flax's default) with a positive `dropout_rate` (one
        dropout mask shared by the batch and the heads).

        Flax computes per batch; call the result on one example and `jax.vmap` it. Outputs
        agree up to float rounding.
        """
        return from_flax_nnx(cls, module)

    def _check_inputs(self, query: Array, key_: Array, value: Array):
        dtypes = {"query": query.dtype, "key_": key_.dtype, "value": value.dtype}
        if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes.values()):
            raise ValueError(
                "complex inputs are unsupported: query, key_ and value must be real floating "
                f"point, got dtypes {', '.join(f'{n}={d}' for n, d in dtypes.items())}"
            )
        for name, x, size in (
            ("query", query, self.query_size),
            ("key_", key_, self.key_size),
            ("value", value, self.value_size),
        ):
            if x.shape[1] != size:
                raise ValueError(f"{name} must have shape (seq, {size}), got {x.shape}")
        if key_.shape[0] != value.shape[0]:
            raise ValueError(
                "key_ and value must have the same sequence length, got "
                f"key_.shape={key_.shape} and value.shape={value.shape}"
            )

    def _check_cache(self, cache: Cache):
        """A cache made for another layout (by a module with other heads) would be written
        into and read from silently wrong, and an integer one would truncate the keys."""
        want = {
            "keys": (self.num_kv_heads, self.qk_size),
            "values": (self.num_kv_heads, self.vo_size),
        }
        for name, (heads, size) in want.items():
            buffer = getattr(cache, name)
            got = (buffer.shape[0], buffer.shape[2])
            if got != (heads, size):
                raise ValueError(
                    f"the cache's {name} have (num_kv_heads, size)={got}, but this module's "
                    f"are (num_kv_heads, size)={(heads, size)}: make the cache with this "
                    "module's init_cache"
                )
        dtypes = (cache.keys.dtype, cache.values.dtype)
        if dtypes[0] != dtypes[1] or not jnp.issubdtype(dtypes[0], jnp.floating):
            raise ValueError(
                "the cache's keys and values must share one floating dtype, got "
                f"keys.dtype={dtypes[0]} and values.dtype={dtypes[1]} (this module's "
                f"default is {self._cache_dtype(None)}): make the cache with init_cache"
            )

    def _check_mask(self, mask: Array | None, bias: Array | None, q_seq: int, kv_seq: int):
        full = (self.num_heads, q_seq, kv_seq)
        for name, x in (("mask", mask), ("bias", bias)):
            if x is None:
                continue
            fits = x.ndim in (1, 2, 3) and all(
                n in (1, e) for n, e in zip(x.shape, full[-x.ndim :], strict=True)
            )
            if not fits:
                raise ValueError(
                    f"{name} must have shape (q_seq, kv_seq)={(q_seq, kv_seq)}, "
                    f"(num_heads, q_seq, kv_seq)={full} or (kv_seq,)={(kv_seq,)}, each axis "
                    f"possibly 1 to broadcast, got {x.shape}"
                )

    def _dropout_args(self, key: PRNGKeyArray | None, inference: bool | None):
        inference = self.dropout.inference if inference is None else inference
        p = self.dropout.p
        # An array rate (set with eqx.tree_at) is passed on as it is, so that changing it does
        # not recompile; only a Python zero switches dropout off before tracing.
        if inference or (isinstance(p, int | float) and p == 0):
            return 0.0, None
        if key is None:
            raise ValueError(
                f"dropout_p={p} needs a PRNG `key` when not in inference mode; pass key=... "
                "or inference=True"
            )
        return p, key

    def _cache_shape(self) -> tuple[int, int, int]:
        return self.num_kv_heads, self.qk_size, self.vo_size

    def _cache_dtype(self, dtype: Any):
        if dtype is not None:
            return dtype
        return self.key_proj.weight.dtype if self.compute_dtype is None else self.compute_dtype

    def _cast_parameters(self) -> "MultiheadAttention":
        """This module with its parameters in `compute_dtype` (itself without one). The
        casts are part of the call, so gradients reach the parameters in their own dtype."""
        if self.compute_dtype is None:
            return self
        names = (
            "query_proj", "key_proj", "value_proj", "output_proj", "query_norm", "key_norm",
            "sinks",
        )  # fmt: skip
        dtype = self.compute_dtype

        def cast(tree):
            return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)

        return eqx.tree_at(
            lambda m: [getattr(m, name) for name in names],
            self,
            [cast(getattr(self, name)) for name in names],
            is_leaf=lambda x: x is None,
        )


def _project(proj: eqx.nn.Linear, x: Array, heads: int) -> Array:
    # Heads are a contiguous, head-major reshape of the projection, as in Equinox.
    return jax.vmap(proj)(x).reshape(x.shape[0], heads, -1)


def _rotate(rope: RotaryPositionalEmbedding, heads: Array, positions: Array) -> Array:
    return jax.vmap(lambda h: rope(h, positions=positions), in_axes=1, out_axes=1)(heads)


def _normalise_window(local_window_size: int | tuple[int, int] | None) -> Window | None:
    if local_window_size is None or isinstance(local_window_size, tuple):
        return local_window_size
    return local_window_size, local_window_size

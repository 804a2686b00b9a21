"""`dot_product_attention` and `dot_product_attention_weights`: per-example pure functions."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._kernels import (
    choose_implementation,
    chunked_attention,
    cudnn_attention,
    xla_attention,
    xla_probs,
)
from ._spec import AttentionSpec, MaskMod, ScoreMod, as_data
from ._vma import vma

BiasArray = Float[Array, "#num_heads #q_seq #kv_seq"] | Float[Array, "#q_seq #kv_seq"]
MaskArray = Bool[Array, "#num_heads #q_seq #kv_seq"] | Bool[Array, "#q_seq #kv_seq"]
Length = int | Int[Array, ""]


def dot_product_attention(
    query: Float[Array, "q_seq num_heads qk_size"],
    key: Float[Array, "kv_seq num_kv_heads qk_size"],
    value: Float[Array, "kv_seq num_kv_heads vo_size"],
    bias: BiasArray | None = None,
    mask: MaskArray | None = None,
    *,
    scale: float | int | None = None,
    is_causal: bool = False,
    query_seq_length: Length | None = None,
    key_value_seq_length: Length | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids: Int[Array, " q_seq"] | None = None,
    kv_segment_ids: Int[Array, " kv_seq"] | None = None,
    logit_softcap: float | int | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    sinks: Float[Array, " num_heads"] | None = None,
    dropout_p: float | int = 0.0,
    dropout_key: PRNGKeyArray | None = None,
    implementation: str | None = None,
) -> Float[Array, "q_seq num_heads vo_size"]:
    r"""Scaled dot-product attention of one example,
    $\mathrm{softmax}(\mathrm{mask}(s \cdot QK^\top + b))V$.

    Call it on a single example and `jax.vmap` over a batch. Grouped-query (GQA) and
    multi-query (MQA) attention happen when `num_kv_heads` divides `num_heads`: query head
    `n` uses key/value head `n // (num_heads // num_kv_heads)`; the key/value heads are never
    repeated in memory.

    **Arguments:**

    - `query`: `(q_seq, num_heads, qk_size)`.
    - `key`: `(kv_seq, num_kv_heads, qk_size)`.
    - `value`: `(kv_seq, num_kv_heads, vo_size)`; `vo_size` may differ from `qk_size`.
    - `bias`: optional float array added to the scaled logits, broadcastable to
      `(num_heads, q_seq, kv_seq)` (ALiBi, relative position biases, additive masks).
    - `mask`: optional boolean array broadcastable to `(num_heads, q_seq, kv_seq)`;
      `False` marks a pair that may not attend.
    - `scale`: logit scale; defaults to `1 / sqrt(qk_size)`.
    - `is_causal`: a query may only attend to keys at or before its own position.
    - `query_seq_length`, `key_value_seq_length`: the number of real (non-padding) query and
      key positions of this example; an int or an int scalar array (so a batch of lengths
      can be `vmap`ped). Padded query rows output zeros.
    - `local_window_size`: `w` or `(left, right)`: a query at position `p` sees keys in
      `[p - left, p + right]`.
    - `query_segment_ids`, `kv_segment_ids`: int arrays `(q_seq,)` and `(kv_seq,)`; a query
      only attends to keys of the same segment (packed documents). Give both or neither.
    - `logit_softcap`: `cap * tanh(logits / cap)` on the scaled (and score-modded) logits, as
      in Gemma 2; `bias` is added after the cap, so an additive mask keeps hiding its keys.
    - `mask_mod`: FlexAttention-style `mask_mod(q_pos, kv_pos) -> bool`, elementwise (it is
      traced once on scalar positions and applied to every block); `False` hides a pair.
    - `score_mod`: `score_mod(score, head, q_pos, kv_pos) -> score`, elementwise, applied to
      the scaled logits (e.g. ALiBi: `score - slope[head] * jnp.abs(q_pos - kv_pos)`).
      Both mods may close over arrays: learned ones (ALiBi slopes, a relative-position
      table) get gradients through every implementation, and per-example ones may be
      `vmap`ped. They only ever see real positions, never the kernels' block padding.

    Every source of masking (causal/window structure, the lengths, segment ids, `mask_mod`,
    `mask`) skips the blocks it hides entirely: the blockwise kernel classifies each
    (query block, key block) pair once per call as empty, full or partial, and visits only
    the non-empty ones, also under `jax.vmap`.
    - `sinks`: optional learned attention-sink logits, float `(num_heads,)`. Head `h`'s
      sink joins the softmax's normaliser as one more key with logit `sinks[h]` (taken as
      it is: not scaled, biased, score-modded or capped) and a zero value, so a row's
      weights sum to less than one and it can attend "nowhere" (gpt-oss, StreamingLLM).
      Differentiable; not supported by `"cudnn"`.
    - `dropout_p`: dropout probability on the attention weights; kept weights are divided by
      `1 - dropout_p` so the output is unbiased.
    - `dropout_key`: PRNG key, required when `dropout_p > 0`. The dropout mask is a function
      of the key and the (head, query, key) indices only, so it is the same for every
      implementation.
    - `implementation`: `None` (automatic), `"xla"` (materialises the logits; the readable
      reference, differentiable in both modes), `"chunked"` (flash-style blocks, O(q_seq)
      memory, skips fully masked blocks; reverse-mode differentiation only) or `"cudnn"`
      (GPU, half precision; raises a `ValueError` naming what it cannot do). `None` picks
      cuDNN on a GPU when it supports the call, else `"xla"` for at most 192 x 192 logits
      per head, else `"chunked"`.

    Positions are **bottom-right aligned**: query row `i` sits at key position
    `kv_seq - q_seq + i`. With `q_seq == kv_seq` this is ordinary self-attention; with fewer
    queries than keys (cached decoding, chunked prefill) the queries are the *last*
    positions. (`jax.nn.dot_product_attention` aligns causal masks top-left instead.)

    Logits, softmax and accumulation run in float32 whatever the input dtype; a query row
    that may attend to no key at all outputs exactly zero, with zero gradients.

    **Returns:**

    Array of shape `(q_seq, num_heads, vo_size)` with the dtype of `value`.
    """
    spec, q, k, v, bias4 = _prepare(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_length=query_seq_length,
        key_value_seq_length=key_value_seq_length,
        local_window_size=local_window_size,
        query_segment_ids=query_segment_ids,
        kv_segment_ids=kv_segment_ids,
        logit_softcap=logit_softcap,
        mask_mod=mask_mod,
        score_mod=score_mod,
        sinks=sinks,
        dropout_p=dropout_p,
        dropout_key=dropout_key,
    )
    impl = choose_implementation(spec, query.dtype, implementation, query.shape[2], value.shape[2])
    if impl == "cudnn":
        return cudnn_attention(query, key, value, bias, mask, spec)
    if impl == "xla":
        out = xla_attention(q, k, v, spec, bias4)
    else:
        out = chunked_attention(q, k, v, spec, bias4)
    num_kv_heads, group, q_seq, vo_size = out.shape
    out = jnp.transpose(out, (2, 0, 1, 3)).reshape(q_seq, num_kv_heads * group, vo_size)
    return out.astype(value.dtype)


def dot_product_attention_weights(
    query: Float[Array, "q_seq num_heads qk_size"],
    key: Float[Array, "kv_seq num_kv_heads qk_size"],
    bias: BiasArray | None = None,
    mask: MaskArray | None = None,
    *,
    scale: float | int | None = None,
    is_causal: bool = False,
    query_seq_length: Length | None = None,
    key_value_seq_length: Length | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids: Int[Array, " q_seq"] | None = None,
    kv_segment_ids: Int[Array, " kv_seq"] | None = None,
    logit_softcap: float | int | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    sinks: Float[Array, " num_heads"] | None = None,
) -> Float[Array, "num_heads q_seq kv_seq"]:
    """The attention probabilities that [`eqx_attention.dot_product_attention`][] uses.

    Takes the same arguments (without `value` and dropout) and materialises the full
    `(num_heads, q_seq, kv_seq)` array, so it is meant for inspection and plots. Rows that may
    attend to nothing are all zero.

    **Returns:**

    Float32 array of shape `(num_heads, q_seq, kv_seq)`; each visible row sums to one, or,
    with `sinks`, to one minus the sink's share.
    """
    spec, q, k, _, bias4 = _prepare(
        query,
        key,
        key,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_length=query_seq_length,
        key_value_seq_length=key_value_seq_length,
        local_window_size=local_window_size,
        query_segment_ids=query_segment_ids,
        kv_segment_ids=kv_segment_ids,
        logit_softcap=logit_softcap,
        mask_mod=mask_mod,
        score_mod=score_mod,
        sinks=sinks,
        dropout_p=0.0,
        dropout_key=None,
    )
    probs = xla_probs(q, k, spec, bias4)
    return probs.reshape(spec.num_heads, spec.q_seq, spec.kv_seq)


def _prepare(
    query,
    key,
    value,
    *,
    bias,
    mask,
    scale,
    is_causal,
    query_seq_length,
    key_value_seq_length,
    local_window_size,
    query_segment_ids,
    kv_segment_ids,
    logit_softcap,
    mask_mod,
    score_mod,
    sinks,
    dropout_p,
    dropout_key,
):
    """Validate the arguments; build the spec and the kernels' `[K, G, T, D]` layout."""
    q_seq, num_heads, qk_size = query.shape
    kv_seq, num_kv_heads, _ = key.shape
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} (query.shape[1]) must be a multiple of "
            f"num_kv_heads={num_kv_heads} (key.shape[1])"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got dropout_p={dropout_p}")
    if dropout_p > 0 and dropout_key is None:
        raise ValueError(f"dropout_p={dropout_p} > 0 needs a dropout_key, got None")
    if (query_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            "query_segment_ids and kv_segment_ids must be given together, got "
            f"query_segment_ids={_describe(query_segment_ids)}, "
            f"kv_segment_ids={_describe(kv_segment_ids)}"
        )
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"logit_softcap must be positive, got logit_softcap={logit_softcap}")
    window = _window(local_window_size)
    group = num_heads // num_kv_heads
    # The mods are elementwise: scalars stand for the blocks they will be applied to, typed
    # (inside shard_map) as varying like the inputs.
    position, axes = jnp.int32(0), vma(query, key, value)
    spec = AttentionSpec(
        q_seq=q_seq,
        kv_seq=kv_seq,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        scale=float(1.0 / math.sqrt(qk_size) if scale is None else scale),
        is_causal=bool(is_causal),
        window=window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        dropout_p=float(dropout_p),
        mask_mod=as_data(mask_mod, "mask_mod", axes, position, position),
        score_mod=as_data(
            score_mod, "score_mod", axes, jnp.float32(0), position, position, position
        ),
        mask=None if mask is None else _split_heads(mask, num_kv_heads, group),
        q_length=_length(query_seq_length),
        kv_length=_length(key_value_seq_length),
        q_segment_ids=query_segment_ids,
        kv_segment_ids=kv_segment_ids,
        dropout_seed=_seed(dropout_key) if dropout_p > 0 else None,
        sinks=None if sinks is None else sinks.astype(jnp.float32).reshape(num_kv_heads, group),
    )
    dtype = _compute_dtype(query.dtype)
    q = query.astype(dtype).reshape(q_seq, num_kv_heads, group, qk_size).transpose(1, 2, 0, 3)
    k = key.astype(dtype).transpose(1, 0, 2)
    v = value.astype(dtype).transpose(1, 0, 2)
    bias4 = None if bias is None else _split_heads(bias.astype(jnp.float32), num_kv_heads, group)
    return spec, q, k, v, bias4


def _compute_dtype(dtype):
    # XLA:CPU runs half-precision matmuls far slower than float32, so upcast there; on
    # accelerators keep the half inputs and accumulate in float32 inside the kernels.
    if jax.default_backend() == "cpu" or jnp.dtype(dtype).itemsize >= 4:
        return jnp.promote_types(dtype, jnp.float32)
    return dtype


def _split_heads(x, num_kv_heads: int, group: int):
    """`[N|1, T|1, S|1]` or `[T|1, S|1]` -> `[K|1, G|1, T|1, S|1]`."""
    if x.ndim == 2:
        return x[None, None]
    if x.shape[0] == 1:
        return x[None]
    return x.reshape(num_kv_heads, group, *x.shape[1:])


def _window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    if isinstance(local_window_size, int):
        local_window_size = (local_window_size, local_window_size)
    left, right = (int(w) for w in local_window_size)
    if left < 0 or right < 0:
        raise ValueError(
            f"local_window_size must be non-negative, got local_window_size={(left, right)}"
        )
    return left, right


def _length(length):
    return None if length is None else jnp.asarray(length, dtype=jnp.int32)


def _seed(key):
    return jax.random.bits(key, (2,), jnp.uint32)


def _describe(x) -> str:
    return "None" if x is None else f"array of shape {tuple(x.shape)}"

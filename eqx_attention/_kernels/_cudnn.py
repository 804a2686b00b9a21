"""Delegation to cuDNN's fused flash attention through `jax.nn.dot_product_attention`."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from .._spec import AttentionSpec
from ._blocks import MASKED


def cudnn_unsupported(spec: AttentionSpec, dtype, qk_size: int, vo_size: int) -> str | None:
    """Why cuDNN cannot run this configuration, or `None` when it can."""
    if jax.default_backend() != "gpu":
        return f"cuDNN needs a GPU backend, this is {jax.default_backend()!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if qk_size != vo_size:
        return f"cuDNN needs qk_size == vo_size, got {qk_size} and {vo_size}"
    if qk_size > 128 or qk_size % 8:
        return f"cuDNN needs a head size <= 128 and divisible by 8, got {qk_size}"
    unsupported = {
        "dropout_p > 0": spec.dropout_p is not None,
        "logit_softcap": spec.logit_softcap is not None,
        "segment ids": spec.q_segment_ids is not None,
        "mask_mod": spec.mask_mod is not None,
        "score_mod": spec.score_mod is not None,
        "sinks": spec.sinks is not None,
        "query_offset/key_positions": spec.query_offset is not None
        or spec.key_positions is not None,
        # jax.nn aligns causal/window masks top-left; ours are bottom-right.
        "is_causal/local_window_size with q_seq != kv_seq": (
            (spec.is_causal or spec.window is not None) and spec.q_seq != spec.kv_seq
        ),
        # cuDNN applies a sliding window only together with a causal mask: a window that
        # reaches right of the query, without is_causal, would silently lose that side.
        "a non-causal local_window_size reaching right of the query": (
            spec.window is not None and not spec.is_causal and spec.window[1] > 0
        ),
    }
    reasons = [name for name, present in unsupported.items() if present]
    return f"cuDNN does not support {', '.join(reasons)}" if reasons else None


def cudnn_attention(query, key, value, bias, mask, spec: AttentionSpec):
    """Run one example through cuDNN (which wants a batch axis) and zero empty rows.

    `query`, `key` and `value` share one dtype. Returns the output `(q_seq, num_heads,
    vo_size)` and the log-sum-exp `(q_seq, num_heads)`, with `MASKED` for empty rows.
    """

    def batched(x):
        return None if x is None else x.reshape((1,) * (4 - x.ndim) + x.shape)

    def lengths(length):
        return None if length is None else jnp.reshape(length, (1,))

    # cuDNN applies a sliding window only together with the causal mask. A window reaching no
    # further right than the query (or one cut there by is_causal) is a causal window: pass
    # it as one. (`cudnn_unsupported` refuses the others.)
    causal, window = spec.is_causal, spec.window
    if window is not None and (causal or window[1] == 0):
        causal, window = True, (window[0], 0)
    out, lse = jax.nn.dot_product_attention(
        query[None], key[None], value[None],
        bias=batched(None if bias is None else bias.astype(query.dtype)),
        mask=batched(mask),
        scale=spec.scale,
        is_causal=causal,
        query_seq_lengths=lengths(spec.q_length),
        key_value_seq_lengths=lengths(spec.kv_length),
        local_window_size=window,
        implementation="cudnn",
        return_residual=True,
    )  # fmt: skip
    has_key = _rows_with_a_key(spec)
    out = jnp.where(has_key[:, :, None], out[0], 0).astype(value.dtype)
    return out, jnp.where(has_key, lse[0].astype(jnp.float32), MASKED)


def _rows_with_a_key(spec: AttentionSpec) -> Bool[Array, "q_seq #num_heads"]:
    """Which query rows (of which heads) see at least one key: the others must output zeros.

    Our contract, which cuDNN does not keep. With a user mask, evaluate visibility fully:
    the mask is already `O(q_seq * kv_seq)`, so this costs nothing new. Without one, causal
    and window rows see themselves (cuDNN runs only with `q_seq == kv_seq`), so a row is
    empty only through its own padding or where the key lengths end before its window
    starts: row `i` sees keys from `max(i - left, 0)` on.
    """
    rows = jnp.arange(spec.q_seq)
    if spec.mask is not None:
        visible = spec.visible(rows, jnp.arange(spec.kv_seq), spec.mask)  # [K|1, G|1, T, S]
        return jnp.moveaxis(jnp.any(visible, axis=-1).reshape(-1, spec.q_seq), 0, 1)
    has_key = jnp.ones((spec.q_seq,), bool)
    if spec.q_length is not None:
        has_key = has_key & (rows < spec.q_length)
    if spec.kv_length is not None:
        first = 0 if spec.window is None else jnp.maximum(rows - spec.window[0], 0)
        has_key = has_key & (first < spec.kv_length)
    return has_key[:, None]

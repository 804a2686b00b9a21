"""Delegation to cuDNN's fused flash attention through `jax.nn.dot_product_attention`."""

import jax
import jax.numpy as jnp

from .._spec import AttentionSpec


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
        "dropout_p > 0": spec.dropout_p > 0,
        "logit_softcap": spec.logit_softcap is not None,
        "segment ids": spec.q_segment_ids is not None,
        "mask_mod": spec.mask_mod is not None,
        "score_mod": spec.score_mod is not None,
        "sinks": spec.sinks is not None,
        # jax.nn aligns causal/window masks top-left; ours are bottom-right.
        "is_causal/local_window_size with q_seq != kv_seq": (
            (spec.is_causal or spec.window is not None) and spec.q_seq != spec.kv_seq
        ),
    }
    reasons = [name for name, present in unsupported.items() if present]
    return f"cuDNN does not support {', '.join(reasons)}" if reasons else None


def cudnn_attention(query, key, value, bias, mask, spec: AttentionSpec):
    """Run one example through cuDNN (which wants a batch axis) and zero empty rows."""

    def batched(x):
        return None if x is None else x[None] if x.ndim == 3 else x[None, None]

    def lengths(length):
        return None if length is None else jnp.reshape(length, (1,))

    out = jax.nn.dot_product_attention(
        query[None], key[None], value[None],
        bias=batched(None if bias is None else bias.astype(query.dtype)),
        mask=batched(mask),
        scale=spec.scale,
        is_causal=spec.is_causal,
        query_seq_lengths=lengths(spec.q_length),
        key_value_seq_lengths=lengths(spec.kv_length),
        local_window_size=spec.window,
        implementation="cudnn",
    )[0]  # fmt: skip
    # Our contract: a query row with no visible key outputs zeros. Besides the lengths, only
    # a user mask can empty a row here (causal/window rows always see themselves when
    # q_seq == kv_seq), and the mask is already O(q_seq * kv_seq), so evaluating it fully
    # costs nothing new. Padded query rows are zeroed here rather than trusting cuDNN to.
    has_key = jnp.ones((spec.q_seq, 1, 1), bool)
    if spec.q_length is not None:
        has_key = has_key & (jnp.arange(spec.q_seq) < spec.q_length)[:, None, None]
    if spec.mask is not None:
        idx_q, idx_kv = jnp.arange(spec.q_seq), jnp.arange(spec.kv_seq)
        visible = spec.visible(idx_q, idx_kv, spec.mask)  # [K|1, G|1, T, S]
        rows = jnp.any(visible, axis=-1)
        has_key = jnp.moveaxis(rows.reshape(-1, spec.q_seq), 0, 1)[:, :, None]
    if spec.kv_length is not None:
        has_key = has_key & (spec.kv_length > 0)
    return jnp.where(has_key, out, 0).astype(value.dtype)

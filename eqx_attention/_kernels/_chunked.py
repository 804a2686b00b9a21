"""Flash-style blockwise attention in pure JAX.

Forward: for each query block, an online softmax over only the key blocks it can see
(causal/window structure decides the range, so masked-out blocks are skipped, not zeroed).
Backward: a `jax.custom_vjp` that recomputes each block from the saved log-sum-exp instead
of storing probabilities, using `delta = rowsum(dO * O)`. Memory is O(q_seq * block).
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._spec import AttentionSpec, dense_block
from ._blocks import block_backward, block_forward, finalize, init_carry


def chunked_attention(
    q: Float[Array, "K G T D"],
    k: Float[Array, "K S D"],
    v: Float[Array, "K S Dv"],
    spec: AttentionSpec,
    bias,
    block_q: int,
    block_k: int,
) -> Float[Array, "K G T Dv"]:
    """Pad to whole blocks, run the blockwise kernel, drop the padding."""
    T, S = spec.q_seq, spec.kv_seq
    block_q, block_k = min(block_q, T), min(block_k, S)
    pad_q, pad_k = -T % block_q, -S % block_k
    q = _pad_axis(q, 2, pad_q)
    k, v = _pad_axis(k, 1, pad_k), _pad_axis(v, 1, pad_k)
    mask = spec.mask
    if mask is not None:
        mask = _pad_dense(mask, pad_q, pad_k, False)
    spec = _replace_mask(spec, mask)
    if bias is not None:
        bias = _pad_dense(bias, pad_q, pad_k, 0.0)
    out = _flash(q, k, v, bias, spec, block_q, block_k)
    return out[:, :, :T]


def _pad_axis(x, axis, pad):
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _pad_dense(x, pad_q, pad_k, value):
    widths = [
        (0, 0),
        (0, 0),
        (0, pad_q if x.shape[2] > 1 else 0),
        (0, pad_k if x.shape[3] > 1 else 0),
    ]
    return jnp.pad(x, widths, constant_values=value)


def _replace_mask(spec: AttentionSpec, mask) -> AttentionSpec:
    # eqx.tree_at cannot replace a None leaf, so rebuild through the dataclass.
    return type(spec)(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "mask": mask})


def _padding_visible(spec: AttentionSpec, kv_idx, visible):
    """Keys past the real sequence are padding: hide them when a block reaches past it."""
    padded = kv_idx[None, None, None, :] < spec.kv_seq
    return padded if visible is None else visible & padded


def _needs_padding_mask(spec: AttentionSpec, block_k: int) -> bool:
    return spec.kv_seq % block_k != 0


def _block_visible(spec, q_idx, kv_idx, mask_blk, block_k):
    visible = spec.visible(q_idx, kv_idx, mask_blk)
    if _needs_padding_mask(spec, block_k):
        visible = _padding_visible(spec, kv_idx, visible)
    return visible


def _forward(q, k, v, bias, spec: AttentionSpec, block_q: int, block_k: int):
    K, G, Tp, _ = q.shape
    Sp, vo_size = k.shape[1], v.shape[-1]
    num_q, num_k = Tp // block_q, Sp // block_k

    def one_query_block(i):
        q_start = i * block_q
        q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, block_q, axis=2)
        q_idx = q_start + jnp.arange(block_q)
        lo, hi = spec.kv_block_range(q_start, block_q, block_k, num_k)

        def step(j, carry):
            kv_start = j * block_k
            kv_idx = kv_start + jnp.arange(block_k)
            k_blk = jax.lax.dynamic_slice_in_dim(k, kv_start, block_k, axis=1)
            v_blk = jax.lax.dynamic_slice_in_dim(v, kv_start, block_k, axis=1)
            mask_blk = dense_block(spec.mask, q_start, block_q, kv_start, block_k)
            bias_blk = dense_block(bias, q_start, block_q, kv_start, block_k)
            visible = _block_visible(spec, q_idx, kv_idx, mask_blk, block_k)
            return block_forward(carry, q_blk, k_blk, v_blk, spec, q_idx, kv_idx, bias_blk, visible)

        return finalize(jax.lax.fori_loop(lo, hi, step, init_carry(q_blk, vo_size)))

    out, lse = jax.lax.map(one_query_block, jnp.arange(num_q))
    # [num_q, K, G, bq, ...] -> [K, G, num_q * bq, ...]
    out = jnp.moveaxis(out, 0, 2).reshape(K, G, Tp, vo_size)
    lse = jnp.moveaxis(lse, 0, 2).reshape(K, G, Tp)
    return out.astype(v.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, bias, spec, block_q, block_k):
    return _forward(q, k, v, bias, spec, block_q, block_k)[0]


def _flash_fwd(q, k, v, bias, spec, block_q, block_k):
    out, lse = _forward(q, k, v, bias, spec, block_q, block_k)
    return out, (q, k, v, bias, spec, out, lse)


def _flash_bwd(block_q, block_k, residuals, d_out):
    q, k, v, bias, spec, out, lse = residuals
    K, G, Tp, _ = q.shape
    Sp = k.shape[1]
    num_q, num_k = Tp // block_q, Sp // block_k
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)

    def one_kv_block(acc, j):
        dq, dbias = acc
        kv_start = j * block_k
        kv_idx = kv_start + jnp.arange(block_k)
        k_blk = jax.lax.dynamic_slice_in_dim(k, kv_start, block_k, axis=1)
        v_blk = jax.lax.dynamic_slice_in_dim(v, kv_start, block_k, axis=1)
        lo, hi = spec.q_block_range(kv_start, block_k, block_q, num_q)

        def step(i, carry):
            dq, dbias, dk_blk, dv_blk = carry
            q_start = i * block_q
            q_idx = q_start + jnp.arange(block_q)
            q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, block_q, axis=2)
            do_blk = jax.lax.dynamic_slice_in_dim(d_out, q_start, block_q, axis=2)
            lse_blk = jax.lax.dynamic_slice_in_dim(lse, q_start, block_q, axis=2)
            delta_blk = jax.lax.dynamic_slice_in_dim(delta, q_start, block_q, axis=2)
            mask_blk = dense_block(spec.mask, q_start, block_q, kv_start, block_k)
            bias_blk = dense_block(bias, q_start, block_q, kv_start, block_k)

            visible = _block_visible(spec, q_idx, kv_idx, mask_blk, block_k)
            dq_blk, dk_step, dv_step, dbias_blk = block_backward(
                q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk, spec, q_idx, kv_idx, bias_blk,
                visible,
            )  # fmt: skip
            dq = _add_slice(dq, dq_blk, q_start, axis=2)
            dk_blk, dv_blk = dk_blk + dk_step, dv_blk + dv_step
            if dbias is not None:
                dbias = _add_dense_block(dbias, dbias_blk, q_start, kv_start)
            return dq, dbias, dk_blk, dv_blk

        zeros_k = jnp.zeros(k_blk.shape, jnp.float32)
        zeros_v = jnp.zeros(v_blk.shape, jnp.float32)
        dq, dbias, dk_blk, dv_blk = jax.lax.fori_loop(lo, hi, step, (dq, dbias, zeros_k, zeros_v))
        return (dq, dbias), (dk_blk, dv_blk)

    dq0 = jnp.zeros(q.shape, jnp.float32)
    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    (dq, dbias), (dk, dv) = jax.lax.scan(one_kv_block, (dq0, dbias0), jnp.arange(num_k))
    # [num_k, K, bk, ...] -> [K, num_k * bk, ...]
    dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
    if dbias is not None:
        dbias = dbias.astype(bias.dtype)
    spec_cotangent = jax.tree.map(lambda _: None, spec)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, spec_cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def _add_slice(x, update, start, axis):
    current = jax.lax.dynamic_slice_in_dim(x, start, update.shape[axis], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(x, current + update, start, axis=axis)


def _add_dense_block(acc, grad, q_start, kv_start):
    """Accumulate a block's bias gradient into the bias's own (broadcast) shape."""
    # Sum over axes the stored bias broadcasts along (its size-1 axes).
    axes = tuple(a for a in range(4) if acc.shape[a] == 1 and grad.shape[a] != 1)
    grad = jnp.sum(grad, axis=axes, keepdims=True)
    starts = [0, 0, q_start if acc.shape[2] != 1 else 0, kv_start if acc.shape[3] != 1 else 0]
    current = jax.lax.dynamic_slice(acc, starts, grad.shape)
    return jax.lax.dynamic_update_slice(acc, current + grad, starts)

"""Attention for a few queries over many keys: decoding steps over a KV cache.

A decoding step reads every key and value once and does two flops per byte: its floor is
memory bandwidth, not the matmul rate. This kernel therefore reads only the key blocks that
can be visible (up to the cache's filled length, from a window's start) and nothing else:
no padding of the keys (which would copy the whole cache), no `[q_seq, kv_seq]` mask, and
all key/value heads of a block at once, each read once for its whole query group. Under
`jax.vmap` the loop runs as long as the longest example needs.

The backward pass (rare when decoding) recomputes through the materialising reference,
whose logits are small here: `q_seq` rows.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._spec import AttentionSpec, dense_block
from .._vma import vary, vma
from ._autodiff import Kernel, attention
from ._blocks import (
    block_forward,
    finalize,
    fused_logits,
    init_carry,
    join_differentiable,
    split_differentiable,
)
from ._plan import batch_max, batch_min
from ._xla import xla_attention


def decode_attention(
    q: Float[Array, "K G T D"],
    k: Float[Array, "K S D"],
    v: Float[Array, "K S Dv"],
    spec: AttentionSpec,
    bias,
    block_k: int,
) -> tuple[Float[Array, "K G T Dv"], Float[Array, "K G T"]]:
    """The output and each row's log-sum-exp (which carries no gradient)."""
    return _decode(q, k, v, bias, spec, min(block_k, spec.kv_seq))


def _key_blocks(spec: AttentionSpec, block_k: int):
    """The half-open range of key blocks that some query may see.

    Ends at the filled length and at the last query's position (causal), starts at the
    first query's window; with `key_positions` the slots are in no order, so all are read.
    """
    S = spec.kv_seq
    lo, hi = 0, S
    if spec.kv_length is not None:
        hi = jnp.clip(spec.kv_length, 0, S)
    if spec.key_positions is None:
        left, right = spec.reach()
        if right is not None:
            hi = jnp.clip(spec.offset + spec.q_seq + right, 0, hi)
        if left is not None:
            lo = jnp.clip(spec.offset - left, 0, S)
    return lo // block_k, -(-hi // block_k)


def _forward(q, k, v, bias, spec: AttentionSpec, block_k: int):
    S = spec.kv_seq
    q_idx = jnp.arange(spec.q_seq)

    def step(j, carry):
        # The last block is shifted back to end at S (no padding, which would copy the
        # keys); the keys it shares with the block before are hidden, so none counts twice.
        start = jnp.minimum(j * block_k, S - block_k)
        kv_idx = start + jnp.arange(block_k)
        k_blk = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=1)
        v_blk = jax.lax.dynamic_slice_in_dim(v, start, block_k, axis=1)
        mask = dense_block(spec.mask, 0, spec.q_seq, start, block_k)
        visible = spec.visible(q_idx, kv_idx, mask)
        fresh = (kv_idx >= j * block_k)[None, None, None, :]
        visible = fresh if visible is None else visible & fresh
        bias_blk = dense_block(bias, 0, spec.q_seq, start, block_k)
        args = (q, k_blk, v_blk, spec, q_idx, kv_idx, bias_blk, visible)
        return block_forward(carry, *args, logits=fused_logits)

    lo, hi = _key_blocks(spec, block_k)
    # Fresh state varies over the mesh axes its inputs do (inside `shard_map`).
    carry = vary(init_carry(q, v.shape[-1]), vma(q, k, v, bias, spec))
    # A batch shares one loop over the union of its examples' blocks; each example's mask
    # hides the blocks outside its own range.
    carry = jax.lax.fori_loop(batch_min(lo), batch_max(hi), step, carry)
    out, lse = finalize(carry, spec.sinks)
    return out.astype(v.dtype), lse


def _decode(q, k, v, bias, spec: AttentionSpec, block_k: int):
    x, aux = split_differentiable(q, k, v, bias, spec)
    out, lse = attention(_Decode(block_k), x, aux)
    return out, jax.lax.stop_gradient(lse)


@dataclasses.dataclass(frozen=True)
class _Decode(Kernel):
    block_k: int

    def forward(self, x, aux):
        q, k, v, bias, spec = join_differentiable(x, aux)
        return _forward(q, k, v, bias, spec, self.block_k)

    def backward(self, x, aux, out, lse, ct_out, ct_lse):
        # The logits are only q_seq rows: the one-shot reference's backward pass is cheap.
        del out, lse

        def reference(x):
            q, k, v, bias, spec = join_differentiable(x, aux)
            return xla_attention(q, k, v, spec, bias, lse_gradient=True)

        _, vjp = jax.vjp(reference, x)
        return vjp((ct_out, ct_lse))[0]

"""Flash-style blockwise attention in pure JAX.

Forward: for each query block, an online softmax over only the key blocks it can see
(causal/window structure decides the range, so masked-out blocks are skipped, not zeroed).
Backward: recomputes each block from the saved log-sum-exp instead of storing
probabilities, using `delta = rowsum(dO * O)`. Memory is O(q_seq * block). The two passes
make a `Kernel` (`_autodiff.py`), which builds every other derivative from them: forward
mode and second order.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._spec import AttentionSpec, dense_block, replace
from .._vma import vary, vma
from ._autodiff import Kernel, attention
from ._blocks import (
    block_backward,
    block_forward,
    finalize,
    fused_logits,
    init_carry,
    join_differentiable,
    key_grad_accumulators,
    score_mod_params,
    sink_grad,
    split_differentiable,
    zeros_like_params,
)
from ._plan import BlockPlan, check_plan, make_plan, run_plan, run_plan_shared


def chunked_attention(
    q: Float[Array, "K G T D"],
    k: Float[Array, "K S D"],
    v: Float[Array, "K S Dv"],
    spec: AttentionSpec,
    bias,
    plan: BlockPlan | None,
    blocks: tuple[int, int, int, int],
) -> tuple[Float[Array, "K G T Dv"], Float[Array, "K G T"]]:
    """Pad to whole blocks, run the blockwise kernel, drop the padding.

    `blocks = (block_q, block_k, fine_q, fine_k)`: `block_q x block_k` tiles cover the inside
    of causal/window patterns; `fine_q`/`fine_k` (which must divide them) are the finer steps
    taken along the pattern's edges. Data-dependent masks take a [`BlockPlan`][] instead,
    `plan` or one built here. Returns the output and each row's log-sum-exp, which carries
    no gradient (as in jax.nn).
    """
    T, S = spec.q_seq, spec.kv_seq
    if plan is None:
        blocks = _fit(T, S, *blocks)
    else:
        # A plan carries its block sizes: the kernel walks its grid.
        check_plan(plan, (T, S) + plan.grid[2:])
        blocks = plan.grid[2:] * 2
    block_q, block_k, fine_q, fine_k = blocks
    q, k, v, spec, bias = pad_to_blocks(q, k, v, spec, bias, block_q, block_k)
    # Data-dependent masks decide per example which blocks to visit; structure alone decides
    # from loop indices, with finer steps along a window's edges.
    if plan is None and not spec.only_structural:
        plan = make_plan(spec, block_q, block_k)
    out, lse = _flash(q, k, v, bias, spec, plan, blocks)
    return out[:, :, :T], lse[:, :, :T]


def pad_to_blocks(q, k, v, spec: AttentionSpec, bias, block_q: int, block_k: int):
    """`(q, k, v, spec, bias)` with the queries and keys (and a dense mask and bias) padded
    with zeros (`False` for the mask) to whole blocks; the spec keeps the real lengths."""
    pad_q, pad_k = -spec.q_seq % block_q, -spec.kv_seq % block_k
    q = _pad_axis(q, 2, pad_q)
    k, v = _pad_axis(k, 1, pad_k), _pad_axis(v, 1, pad_k)
    spec = _pad_mask(spec, pad_q, pad_k)
    if bias is not None:
        bias = _pad_dense(bias, pad_q, pad_k, 0.0)
    return q, k, v, spec, bias


def block_plan(
    spec: AttentionSpec, blocks: tuple[int, int, int, int], fit: bool = True
) -> BlockPlan:
    """The plan `chunked_attention` would build for `spec` with these block sizes; with
    `fit=False`, on blocks of exactly these sizes, even where they are longer than the
    sequences (which are then padded to one block)."""
    T, S = spec.q_seq, spec.kv_seq
    block_q, block_k, _, _ = _fit(T, S, *blocks) if fit else blocks
    pad_q, pad_k = -T % block_q, -S % block_k
    return make_plan(_pad_mask(spec, pad_q, pad_k), block_q, block_k)


def _fit(T: int, S: int, block_q: int, block_k: int, fine_q: int, fine_k: int):
    """Block sizes for these lengths: short sequences make a single block, whose edge steps
    must still divide it."""
    block_q, block_k = min(block_q, T), min(block_k, S)
    fine_q = fine_q if block_q % fine_q == 0 else block_q
    fine_k = fine_k if block_k % fine_k == 0 else block_k
    return block_q, block_k, fine_q, fine_k


def _pad_mask(spec: AttentionSpec, pad_q: int, pad_k: int) -> AttentionSpec:
    if spec.mask is None:
        return spec
    return replace(spec, mask=_pad_dense(spec.mask, pad_q, pad_k, False))


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


def _split(lo, hi, inner_lo, inner_hi, coarse: int, fine: int):
    """Cover `[lo, hi)` with coarse blocks, and fine ones only at ends off the coarse grid.

    Returns five half-open block-index ranges: fine blocks from `lo` to the first coarse
    boundary, masked coarse blocks, coarse blocks inside `[inner_lo, inner_hi)` (which need
    no structural mask), masked coarse blocks, and fine blocks from the last coarse boundary
    to `hi`. Fine blocks skip work only where a range ends inside a coarse block (a window's
    edge); on the grid, one coarse block is cheaper than several fine ones (see
    `benchmarks/tiles.py`), so a causal diagonal is always one masked coarse block.
    """
    ratio = coarse // fine
    f_lo, f_hi = lo // fine, -(-hi // fine)
    grid_lo, grid_hi = -(-lo // coarse), hi // coarse
    # A range inside one coarse block, off the grid at both ends, is all fine blocks.
    on_grid = grid_lo <= grid_hi
    grid_lo, grid_hi = jnp.where(on_grid, grid_lo, 0), jnp.where(on_grid, grid_hi, 0)
    c_lo = jnp.clip(-(-inner_lo // coarse), grid_lo, grid_hi)
    c_hi = jnp.clip(inner_hi // coarse, c_lo, grid_hi)
    return (
        (f_lo, jnp.where(on_grid, grid_lo * ratio, f_hi)),
        (grid_lo, c_lo),
        (c_lo, c_hi),
        (c_hi, grid_hi),
        (jnp.where(on_grid, grid_hi * ratio, f_hi), f_hi),
    )


def _run_blocks(ranges, coarse: int, fine: int, step, carry):
    """Fold `step(start, width, needs_mask, carry)` over the five ranges of [`_split`][].

    Only for structural masking: the interior of the pattern then needs no mask.
    """
    parts = _split(*ranges, coarse, fine)
    widths = (fine, coarse, coarse, coarse, fine)
    interior = (False, False, True, False, False)
    for (lo, hi), width, inside in zip(parts, widths, interior, strict=True):

        def body(j, c, width=width, inside=inside):
            return step(j * width, width, not inside, c)

        carry = jax.lax.fori_loop(lo, hi, body, carry)
    return carry


def _block_step(step, width: int, block, needs_mask: bool, carry):
    """A plan's block index as the `(start, width)` step of the range loops."""
    return step(block * width, width, needs_mask, carry)


def _head_block(x: Float[Array, "K S D"], spec: AttentionSpec, start, width: int):
    """Keys or values `[start, start + width)` of the spec's one key/value head, `[1, width, D]`."""
    return jax.lax.dynamic_slice(x, (spec.kv_head, start, 0), (1, width, x.shape[2]))


def _visible(spec: AttentionSpec, needs_mask: bool, q_idx, kv_idx, mask_blk, may_pad: bool):
    """The block's mask; `None` for a block in which every pair may attend.

    `needs_mask` says whether anything but key padding may hide a pair; `may_pad` whether
    the block can reach into the key padding that fills the last block.
    """
    visible = spec.visible(q_idx, kv_idx, mask_blk) if needs_mask else None
    if may_pad:
        padding = kv_idx[None, None, None, :] < spec.kv_seq
        visible = padding if visible is None else visible & padding
    return visible


def _forward(q, k, v, bias, spec: AttentionSpec, plan: BlockPlan | None, blocks):
    block_q, block_k, _, fine_k = blocks
    K, G, Tp, _ = q.shape
    vo_size = v.shape[-1]

    def one_query_block(i):
        q_start = i * block_q
        q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, block_q, axis=2)
        q_idx = q_start + jnp.arange(block_q)

        def step(kv_start, width, needs_mask, carry):
            kv_idx = kv_start + jnp.arange(width)
            k_blk = _head_block(k, spec, kv_start, width)
            v_blk = _head_block(v, spec, kv_start, width)
            mask_blk = dense_block(spec.mask, q_start, block_q, kv_start, width)
            bias_blk = dense_block(bias, q_start, block_q, kv_start, width)
            # Blocks that need no mask end at or before kv_seq: only the others can reach padding.
            may_pad = needs_mask and spec.kv_seq % width != 0
            visible = _visible(spec, needs_mask, q_idx, kv_idx, mask_blk, may_pad)
            args = (q_blk, k_blk, v_blk, spec, q_idx, kv_idx, bias_blk, visible)
            return block_forward(carry, *args, logits=fused_logits)

        # Fresh state varies over the mesh axes its inputs do (inside `shard_map`).
        carry = vary(init_carry(q_blk, vo_size), vma(q, k, v, bias, spec, plan))
        if plan is None:
            carry = _run_blocks(spec.kv_ranges(q_start, block_q), block_k, fine_k, step, carry)
        else:
            blocks = functools.partial(_block_step, step, block_k)
            carry = run_plan(plan.kv_count[i], plan.kv_index[i], blocks, carry)
        return finalize(carry, spec.sinks)

    out, lse = jax.lax.map(one_query_block, jnp.arange(Tp // block_q))
    # [num_q, K, G, bq, ...] -> [K, G, num_q * bq, ...]
    out = jnp.moveaxis(out, 0, 2).reshape(K, G, Tp, vo_size)
    lse = jnp.moveaxis(lse, 0, 2).reshape(K, G, Tp)
    return out.astype(v.dtype), lse


def _per_kv_head(fn, spec: AttentionSpec, bias, *arrays):
    """`fn(spec, bias, *arrays)` on one key/value head (and its query group) at a time.

    A block's logits for a single head stay in cache, whereas all heads at once spill out of
    it: on CPU this runs markedly faster. Outputs gain a leading `num_kv_heads` axis. The
    keys and values are not among `arrays`: `fn` reads its head's blocks from them with
    [`_head_block`][] rather than being handed a copy of the head (which, for a KV cache,
    would copy every slot, filled or not).
    """
    K = spec.num_kv_heads

    def split(x):
        # Dense masks/biases with a real head axis are sliced per head; others are shared.
        return (x, None) if x is not None and K > 1 and x.shape[0] == K else (None, x)

    (mask_per_head, mask_shared), (bias_per_head, bias_shared) = split(spec.mask), split(bias)

    def one_head(xs):
        head, mask_h, bias_h, sinks_h, arrays_h = xs
        mask_h = mask_shared if mask_h is None else mask_h[None]
        bias_h = bias_shared if bias_h is None else bias_h[None]
        sinks_h = None if sinks_h is None else sinks_h[None]
        spec_h = replace(spec, mask=mask_h, sinks=sinks_h, kv_head=head)
        return fn(spec_h, bias_h, *(a[None] for a in arrays_h))

    xs = (jnp.arange(K), mask_per_head, bias_per_head, spec.sinks, arrays)
    return jax.lax.map(one_head, xs)


def _flash(q, k, v, bias, spec: AttentionSpec, plan: BlockPlan | None, blocks):
    x, aux = split_differentiable(q, k, v, bias, spec)
    out, lse = attention(_Blockwise(blocks), x, (aux, plan))
    # The log-sum-exp is a residual for the caller, as in jax.nn: no gradient flows through it.
    return out, jax.lax.stop_gradient(lse)


@dataclasses.dataclass(frozen=True)
class _Blockwise(Kernel):
    blocks: tuple[int, int, int, int]

    def forward(self, x, aux):
        aux, plan = aux
        q, k, v, bias, spec = join_differentiable(x, aux)

        def forward(spec, bias, q):
            return _forward(q, k, v, bias, spec, plan, self.blocks)

        out, lse = _per_kv_head(forward, spec, bias, q)
        return out[:, 0], lse[:, 0]

    def backward(self, x, aux, out, lse, ct_out, ct_lse):
        aux, plan = aux
        q, k, v, bias, spec = join_differentiable(x, aux)
        d_out = ct_out.astype(jnp.float32)
        # A cotangent of the log-sum-exp adds p * ct_lse to the logits' gradient: it enters
        # as a shift of delta = rowsum(d_out * out).
        delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1) - ct_lse

        def backward(spec, bias, q, lse, delta, d_out):
            return _backward(q, k, v, bias, spec, plan, lse, delta, d_out, self.blocks)

        dq, dk, dv, dbias, dmod = _per_kv_head(backward, spec, bias, q, lse, delta, d_out)
        if dbias is not None:
            # A bias shared by all heads collects every head's gradient.
            dbias = dbias[:, 0] if bias.shape[0] > 1 else jnp.sum(dbias, axis=0)
        # score_mod is shared by the heads (they are its argument), so it collects them all.
        dmod = jax.tree.map(lambda g: jnp.sum(g, axis=0), dmod)
        dsinks = None if spec.sinks is None else sink_grad(spec.sinks, lse, delta)
        grads = (dq[:, 0], dk[:, 0], dv[:, 0], dbias, dsinks, dmod)
        return jax.tree.map(lambda g, x: g.astype(x.dtype), grads, x)


def _backward(
    q, k, v, bias, spec: AttentionSpec, plan: BlockPlan | None, lse, delta, d_out, blocks
):
    """Gradients `(dq, dk, dv, dbias, dmod)`, looping over key blocks outside, queries inside.

    `delta = rowsum(d_out * out)`, in float32 like `d_out`.
    """
    block_q, block_k, fine_q, _ = blocks
    Sp = k.shape[1]
    # Keys are walked in whole blocks. Half-width steps kept a step's temporaries in L2, but
    # since the key gradients accumulate transposed, whole blocks run forward+backward 4-13%
    # faster (docs/benchmarks.md), and each is one block of a plan.
    padded = Sp > spec.kv_seq

    # Transposed once here, so that each block's key gradients read them in order.
    q_t, d_out_t = jnp.swapaxes(q, 2, 3), jnp.swapaxes(d_out, 2, 3)

    def one_kv_block(acc, j):
        dq, dbias, dmod = acc
        kv_start = j * block_k
        kv_idx = kv_start + jnp.arange(block_k)
        k_blk = _head_block(k, spec, kv_start, block_k)
        v_blk = _head_block(v, spec, kv_start, block_k)

        def step(q_start, width, needs_mask, carry, valid=None):
            dq, dbias, dmod, dk_blk, dv_blk = carry
            q_idx = q_start + jnp.arange(width)
            rows = [
                jax.lax.dynamic_slice_in_dim(x, q_start, width, axis=2)
                for x in (q, d_out, lse, delta)
            ]
            columns = [
                jax.lax.dynamic_slice_in_dim(x, q_start, width, axis=3) for x in (q_t, d_out_t)
            ]
            mask_blk = dense_block(spec.mask, q_start, width, kv_start, block_k)
            bias_blk = dense_block(bias, q_start, width, kv_start, block_k)
            # Which key block holds the padding is only known at run time: check every block,
            # but for a plan's full ones, which hold none.
            may_pad = padded and (needs_mask or plan is None)
            visible = _visible(spec, needs_mask, q_idx, kv_idx, mask_blk, may_pad)
            args = (rows[0], k_blk, v_blk, *rows[1:], spec, q_idx, kv_idx, bias_blk, visible)
            grads = block_backward(*args, *columns, logits=fused_logits)
            if valid is not None:
                # Not one of this example's blocks (the batch shares the plan's loop).
                grads = jax.tree.map(lambda g: jnp.where(valid, g, 0), grads)
            dq_blk, dk_step, dv_step, dbias_blk, dmod_blk = grads
            dq = _add_slice(dq, dq_blk, q_start, axis=2)
            if dbias is not None:
                dbias = _add_dense_block(dbias, dbias_blk, q_start, kv_start)
            dmod = jax.tree.map(jnp.add, dmod, dmod_blk)
            return dq, dbias, dmod, dk_blk + dk_step, dv_blk + dv_step

        zeros_k, zeros_v = vary(key_grad_accumulators(k_blk, v_blk), axes)
        carry = (dq, dbias, dmod, zeros_k, zeros_v)
        if plan is None:
            ranges = spec.q_ranges(kv_start, block_k)
            carry = _run_blocks(ranges, block_q, fine_q, step, carry)
        else:

            def visit(block, needs_mask, valid, carry):
                return step(block * block_q, block_q, needs_mask, carry, valid)

            count, index = plan.q_count[j], plan.q_index[j]
            carry = run_plan_shared(count, index, visit, carry)
        dq, dbias, dmod, dk_blk, dv_blk = carry
        return (dq, dbias, dmod), (dk_blk, dv_blk)

    # Fresh accumulators vary over the mesh axes the inputs do (inside `shard_map`).
    axes = vma(q, k, v, bias, spec, plan, lse, delta, d_out)
    dq0 = jnp.zeros(q.shape, jnp.float32)
    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    # Summed block by block in a fixed order: deterministic, and as large as the parameters.
    dmod0 = zeros_like_params(score_mod_params(spec)[0])
    dq0, dbias0, dmod0 = vary((dq0, dbias0, dmod0), axes)
    (dq, dbias, dmod), (dk, dv) = jax.lax.scan(
        one_kv_block, (dq0, dbias0, dmod0), jnp.arange(Sp // block_k)
    )
    # [num_k, K, size, bk] -> [K, num_k * bk, size]
    dk = jnp.moveaxis(jnp.swapaxes(dk, 2, 3), 0, 1).reshape((1,) + k.shape[1:])
    dv = jnp.moveaxis(jnp.swapaxes(dv, 2, 3), 0, 1).reshape((1,) + v.shape[1:])
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, dmod


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

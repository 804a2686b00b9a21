"""The block plan: which (query block, key block) pairs the blockwise kernel visits.

Causal and window structure alone decide their block ranges from loop indices
(`AttentionSpec.kv_ranges`). Every other source of masking depends on data: lengths, offsets,
segment ids, key positions, `mask_mod`, a dense mask. For those the plan is built per example,
on device, from the spec itself, and each block pair becomes *empty* (skipped), *full*
(attended with no mask at all) or *partial* (masked). Intervals (causality, windows, lengths,
offsets) and segment ids are classified from per-block summaries, in O(blocks + seq); a
`mask_mod`, a dense mask or key positions from every (query, key) pair of the padded grid.

The kernels then loop over compact lists of block indices, so under `jax.vmap` a hidden
block is still skipped rather than computed and discarded: the loop runs as long as the
example with the most blocks needs, and a `lax.cond` (which `vmap` turns into a select that
computes both branches) is never involved.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Bool, Int

from .._spec import AttentionSpec, dense_block

EMPTY, PARTIAL, FULL = 0, 1, 2


class BlockPlan(eqx.Module):
    """Which blocks the blockwise kernel visits, for one example: build it once with
    [`eqx_attention.make_block_plan`][] and pass it to every call with the same masking.

    On the kernel's `block_q x block_k` grid of the padded inputs, `kv_count[i] = (full,
    partial)` counts the key blocks query block `i` visits; `kv_index[i, 0, :full]` lists
    the full ones (attended with no mask at all), `kv_index[i, 1, :partial]` the partial
    ones. `q_count`/`q_index` are the transpose, for the backward pass. The plan is
    O(q_seq * kv_seq / block**2) integers; `jax.vmap` the builder for a batch.
    """

    kv_count: Int[Array, "num_q 2"]
    kv_index: Int[Array, "num_q 2 num_k"]
    q_count: Int[Array, "num_k 2"]
    q_index: Int[Array, "num_k 2 num_q"]
    # What the plan was built for, `(q_seq, kv_seq, block_q, block_k)`: checked on use.
    grid: tuple[int, int, int, int] = eqx.field(static=True)


def block_states(spec: AttentionSpec, block_q: int, block_k: int) -> Int[Array, "num_q num_k"]:
    """`EMPTY`, `PARTIAL` or `FULL` for every block pair, from every mask source.

    The grid covers the lengths padded to whole blocks; `spec.mask`, when present, is already
    padded so. Padding query rows are ignored (their output is dropped); padding keys are
    hidden, so a block holding some is at most partial. Pairs are classified one query block
    at a time: memory stays O(block_q * kv_seq), never O(q_seq * kv_seq).
    """
    padded_q, padded_k = _whole_blocks(spec.q_seq, block_q), _whole_blocks(spec.kv_seq, block_k)
    grid = (padded_q // block_q, padded_k // block_k, block_q, block_k)
    if all(x is None for x in (spec.mask, spec.mask_mod, spec.key_positions)):
        states = _interval_states(spec, *grid)
        if spec.q_segment_ids is not None:
            # A pair is visible if both sources let it be: empty if either hides it all,
            # full if neither hides any of it.
            states = jnp.minimum(states, _segment_states(spec, *grid))
        return states
    kv_idx = jnp.arange(padded_k)
    real_k = kv_idx < spec.kv_seq

    def row(i):
        q_idx = i * block_q + jnp.arange(block_q)
        mask = dense_block(spec.mask, i * block_q, block_q, 0, padded_k)
        visible = spec.visible(q_idx, kv_idx, mask)
        if padded_k > spec.kv_seq:
            padding = real_k[None, None, None, :]
            visible = padding if visible is None else visible & padding
        if visible is None:
            return jnp.full(padded_k // block_k, FULL, jnp.int32)
        # Padding rows and keys exist only off the block grid: skip that work otherwise.
        real_q = q_idx < spec.q_seq if padded_q > spec.q_seq else None
        return classify(visible, block_k, real_q)

    return jax.lax.map(row, jnp.arange(padded_q // block_q))


def _interval_states(spec: AttentionSpec, num_q: int, num_k: int, block_q: int, block_k: int):
    """Block states from each block's corners, when every query sees an interval of keys
    (causality, a window, the lengths and a query offset): O(blocks), not O(q_seq * kv_seq).

    A block is some-visible if the union of its real rows' intervals, itself an interval
    (consecutive rows shift it by one), meets its keys; full if every row's interval holds
    all of its keys and none of them is padding or past the filled length.
    """
    left, right = spec.reach()
    q0 = jnp.arange(num_q, dtype=jnp.int32)[:, None] * block_q
    q1 = jnp.minimum(q0 + block_q, spec.q_seq) - 1  # the last real row
    k0 = jnp.arange(num_k, dtype=jnp.int32)[None, :] * block_k
    k1 = k0 + block_k - 1  # padding included: keys past kv_seq are hidden
    q_limit = spec.q_seq if spec.q_length is None else jnp.minimum(spec.q_length, spec.q_seq)
    kv_limit = spec.kv_seq if spec.kv_length is None else jnp.minimum(spec.kv_length, spec.kv_seq)
    q_seen = jnp.minimum(q1, q_limit - 1)  # the last row that may see anything
    k_seen = jnp.minimum(k1, kv_limit - 1)
    lo, hi = k0, k_seen
    if left is not None:
        lo = jnp.maximum(lo, spec.q_positions(q0) - left)
    if right is not None:
        hi = jnp.minimum(hi, spec.q_positions(q_seen) + right)
    some = (q0 <= q_seen) & (lo <= hi)
    every = (q1 < q_limit) & (k1 < kv_limit)
    if left is not None:
        every &= k0 >= spec.q_positions(q1) - left
    if right is not None:
        every &= k1 <= spec.q_positions(q0) + right
    return jnp.where(every, FULL, jnp.where(some, PARTIAL, EMPTY)).astype(jnp.int32)


def _segment_states(spec: AttentionSpec, num_q: int, num_k: int, block_q: int, block_k: int):
    """Block states of the segment ids from each block's smallest and largest id.

    Exact for packed documents (ids that never decrease): a block pair whose id ranges do
    not meet is empty, one whose blocks hold a single, equal id is full, and any other shares
    an id. For ids in no order, a pair whose ranges meet without sharing an id is called
    partial: visited and masked, never wrong. O(q_seq + kv_seq), not O(q_seq * kv_seq).
    """

    def ranges(ids, num, block):
        # Padding takes the last real id, which its block holds anyway.
        ids = jnp.pad(ids, (0, num * block - ids.shape[0]), mode="edge").reshape(num, block)
        return jnp.min(ids, axis=1), jnp.max(ids, axis=1)

    q_lo, q_hi = ranges(spec.q_segment_ids, num_q, block_q)
    k_lo, k_hi = ranges(spec.kv_segment_ids, num_k, block_k)
    q_lo, q_hi, k_lo, k_hi = q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :]
    some = (q_lo <= k_hi) & (k_lo <= q_hi)
    every = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    return jnp.where(every, FULL, jnp.where(some, PARTIAL, EMPTY)).astype(jnp.int32)


def classify(visible, block_k: int, real_q=None) -> Int[Array, " num_k"]:
    """The state of each key block of one query block's `[_, _, bq, num_k * block_k]`
    visibility; query rows where `real_q` is False (padding) count neither way."""
    block_q, width = visible.shape[-2:]
    visible = jnp.broadcast_to(visible, visible.shape[:2] + (block_q, width))
    # Heads of a dense mask may differ: a block is full only if full for every head.
    visible = visible.reshape(-1, block_q, width // block_k, block_k)
    rows = block_q
    if real_q is not None:
        visible, rows = visible & real_q[None, :, None, None], jnp.sum(real_q)
    # One counting pass decides both: some pair visible, and every (real) pair visible.
    count = jnp.sum(visible, axis=(0, 1, 3), dtype=jnp.int32)
    every = count == visible.shape[0] * rows * block_k
    return jnp.where(every, FULL, jnp.where(count > 0, PARTIAL, EMPTY)).astype(jnp.int32)


def visit_lists(states: Int[Array, "n m"]) -> tuple[Int[Array, "n 2"], Int[Array, "n 2 m"]]:
    """Per row: the counts and (in ascending order, first) indices of full and partial blocks."""
    kinds = jnp.stack([states == FULL, states == PARTIAL], axis=1)  # [n, 2, m]
    # A stable sort on "not of this kind" brings the wanted indices to the front, in order.
    index = jnp.argsort(~kinds, axis=-1, stable=True).astype(jnp.int32)
    return jnp.sum(kinds, axis=-1, dtype=jnp.int32), index


def _whole_blocks(length: int, block: int) -> int:
    return -(-length // block) * block


def make_plan(spec: AttentionSpec, block_q: int, block_k: int) -> BlockPlan:
    states = block_states(spec, block_q, block_k)
    kv_count, kv_index = visit_lists(states)
    q_count, q_index = visit_lists(states.T)
    grid = (spec.q_seq, spec.kv_seq, block_q, block_k)
    return BlockPlan(kv_count, kv_index, q_count, q_index, grid)


def check_plan(plan: BlockPlan, grid: tuple[int, int, int, int]) -> None:
    if plan.grid != grid:
        built, call = (
            f"q_seq={g[0]}, kv_seq={g[1]} on {g[2]} x {g[3]} blocks" for g in (plan.grid, grid)
        )
        raise ValueError(f"block_plan was built for {built}, but this call has {call}")


def run_plan(count, index, step, carry):
    """Fold `step(block, needs_mask, carry)` over a plan's full, then partial, blocks."""
    for kind, needs_mask in ((0, False), (1, True)):

        def gathered(c, kind=kind, needs_mask=needs_mask):
            def body(j, c):
                return step(index[kind, j], needs_mask, c)

            return jax.lax.fori_loop(0, count[kind], body, c)

        carry = _as_range_if_shared(
            count[kind], index[kind], needs_mask, step, gathered, carry, whole_as_scan=True
        )
    return carry


def run_plan_shared(count, index, step, carry):
    """As [`run_plan`][], with one loop for a whole batch: `step(block, needs_mask, valid,
    carry)`, which must leave `carry` as it is where `valid` is False (`None`: all valid).

    Under `vmap` the loop runs as long as the batch's longest list; entries past an example's
    own count are not its blocks (`valid` is False). With per-example trip counts, `vmap`
    would instead select between the old and new carry at every step: for the backward
    pass's carry, which holds the whole `dq`, that select costs more than the block.
    """

    def ranged(block, needs_mask, c):
        return step(block, needs_mask, None, c)

    for kind, needs_mask in ((0, False), (1, True)):
        own = count[kind]

        def gathered(c, kind=kind, needs_mask=needs_mask, own=own):
            def body(j, c):
                return step(index[kind, j], needs_mask, j < own, c)

            return jax.lax.fori_loop(0, batch_max(own), body, c)

        carry = _as_range_if_shared(own, index[kind], needs_mask, ranged, gathered, carry)
    return carry


def _as_range_if_shared(
    count, index, needs_mask: bool, step, gathered, carry, whole_as_scan: bool = False
):
    """`gathered(carry)`, or the same blocks as a range of loop indices where every example of
    the batch has the same list and it is a range (as when nothing can be skipped).

    A plan's block indices are per-example data: under `vmap`, a block read at such an index
    is a gather, and an accumulation into `dq` a scatter. A range shared by the batch needs
    neither. The test is a few comparisons, and its outcome is one value for the whole batch,
    so `lax.cond` runs one branch even under `vmap`.
    """
    first = jnp.where(count > 0, index[0], 0)
    positions = jnp.arange(index.shape[0])
    is_range = jnp.all((positions >= count) | (index == first + positions))
    start, length = batch_min(first), batch_min(count)
    shared = batch_all(is_range) & (start == batch_max(first)) & (length == batch_max(count))
    stop, num = start + length, index.shape[0]

    def visit(block, c):
        return step(block, needs_mask, c)

    def ranged(c):
        return jax.lax.fori_loop(start, stop, visit, c)

    def every_block(c):
        # A trip count known when compiling lets XLA schedule the loop as a scan.
        return jax.lax.fori_loop(0, num, visit, c)

    if not whole_as_scan:
        return jax.lax.cond(shared, ranged, gathered, carry)
    branch = jnp.where(shared, jnp.where((start == 0) & (stop == num), 0, 1), 2)
    return jax.lax.switch(branch, (every_block, ranged, gathered), carry)


def _shared_by_the_batch(reduce):
    """The identity on one example; under `vmap`, `reduce` over the batch, unbatched."""

    @custom_vmap
    def shared(bound: Int[Array, ""] | Bool[Array, ""]) -> Int[Array, ""] | Bool[Array, ""]:
        return bound

    @shared.def_vmap
    def rule(axis_size, in_batched, bound):
        del axis_size, in_batched
        return reduce(bound, axis=0), False

    return shared


# Loop bounds a batch shares under `jax.vmap`, so that the loop index stays unbatched: blocks
# are sliced rather than gathered and no carry is selected. The loops' bodies hide what lies
# outside an example's own range.
batch_min = _shared_by_the_batch(jnp.min)
batch_max = _shared_by_the_batch(jnp.max)
batch_all = _shared_by_the_batch(jnp.all)

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

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Bool, Int, UInt32

from .._spec import AttentionSpec, TracedMod, _mix32, dense_block, known

EMPTY, PARTIAL, FULL = 0, 1, 2


class BlockPlan(eqx.Module):
    """Which blocks the blockwise kernel visits, for one example: build it once with
    [`eqx_attention.make_block_plan`][] and pass it to every call with the same masking.

    On the kernel's `block_q x block_k` grid of the padded inputs, `kv_count[i] = (full,
    partial)` counts the key blocks query block `i` visits; `kv_index[i, 0, :full]` lists
    the full ones (attended with no mask at all), `kv_index[i, 1, :partial]` the partial
    ones. `q_count`/`q_index` are the transpose, for the backward pass. The plan is
    O(q_seq * kv_seq / block**2) integers; `jax.vmap` the builder for a batch.

    It also records the masking it was built from (`masking`, with the values or digests of
    the traced arguments in `fingerprint`), which every call given the plan checks against
    its own: see [`eqx_attention.make_block_plan`][].
    """

    kv_count: Int[Array, "num_q 2"]
    kv_index: Int[Array, "num_q 2 num_k"]
    q_count: Int[Array, "num_k 2"]
    q_index: Int[Array, "num_k 2 num_q"]
    # What the plan was built for, `(q_seq, kv_seq, block_q, block_k)`: checked on use.
    grid: tuple[int, int, int, int] = eqx.field(static=True)
    # The masking it was built from (`record_masking`), whatever the block sizes: `(name,
    # value, digest)` entries, where an array's value is `ARRAY`, standing for the next
    # entry of `fingerprint`. `None` for a plan a kernel built for its own use.
    masking: tuple[tuple[str, object, bool], ...] | None = eqx.field(static=True, default=None)
    fingerprint: tuple[Array, ...] = ()


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


class _Array:
    """A `BlockPlan.masking` value that is an array, kept in the plan's `fingerprint`."""

    def __repr__(self) -> str:
        return "ARRAY"


ARRAY = _Array()
# The sources whose presence a plan records by the shape of their array.
_SHAPED = ("mask", "query_segment_ids", "key_positions")


def masking_entries(spec: AttentionSpec) -> list[tuple[str, object, bool]]:
    """What a plan's blocks depend on, as `(name, value, digest)`, independent of block sizes.

    First the structure, known when tracing: the sizes, `is_causal`, the window, which dense
    mask, segment ids, key positions and `mask_mod` there are (by shape, and the mod by its
    jaxpr). Then the values: the lengths (clipped to the sequences, the sequence itself when
    not given) and the query offset, Python ints where the spec has no array for them, and
    32-bit digests (`digest=True`) of the segment ids, key positions, dense mask and of the
    arrays `mask_mod` captures (a captured scalar is kept as it is).
    """
    mask = spec.mask
    entries = [
        ("q_seq", spec.q_seq, False),
        ("kv_seq", spec.kv_seq, False),
        ("is_causal", spec.is_causal, False),
        ("local_window_size", spec.window, False),
        ("mask", None if mask is None else (mask.shape[0] * mask.shape[1], *mask.shape[2:]), False),
        ("query_segment_ids", _shape(spec.q_segment_ids), False),
        ("key_positions", _shape(spec.key_positions), False),
        ("mask_mod", None if spec.mask_mod is None else spec.mask_mod.traced, False),
        ("query_seq_length", _clipped(spec.q_length, spec.q_seq), False),
        ("key_value_seq_length", _clipped(spec.kv_length, spec.kv_seq), False),
        ("query_offset", spec.offset, False),
    ]
    arrays = [
        ("query_segment_ids", spec.q_segment_ids),
        ("kv_segment_ids", spec.kv_segment_ids),
        ("key_positions", spec.key_positions),
        ("mask", mask),
    ]
    if spec.mask_mod is not None:
        consts = spec.mask_mod.consts
        arrays += [(f"mask_mod's captured array {i}", c) for i, c in enumerate(consts)]
    for name, x in arrays:
        if x is not None:
            scalar = name.startswith("mask_mod") and x.ndim == 0
            entries.append((name, x if scalar else _digest(x), not scalar))
    return entries


def record_masking(plan: BlockPlan, spec: AttentionSpec) -> BlockPlan:
    """`plan`, recording that it was built for `spec`'s masking (see `check_plan_matches`)."""
    entries = masking_entries(spec)
    masking = tuple((n, ARRAY if eqx.is_array(v) else v, d) for n, v, d in entries)
    fingerprint = tuple(v for _, v, _ in entries if eqx.is_array(v))
    return dataclasses.replace(plan, masking=masking, fingerprint=fingerprint)


def check_plan_matches(plan: BlockPlan, spec: AttentionSpec, x):
    """`x`, once `plan` is known to have been built for `spec`'s masking.

    Compares every entry of [`masking_entries`][] in order. A difference known now raises a
    `ValueError` naming it: any difference in structure, and values that are concrete on
    both sides (also under `vmap`, per example). Values traced on either side (inside `jit`)
    are compared when the call runs: `x` comes back with an `eqx.error_if` threaded onto it,
    so the call raises at run time, naming the entry, wherever `x` is used.
    """
    if plan.masking is None:
        raise ValueError(
            "block_plan records no masking to check against this call's: build it with "
            "eqx_attention.make_block_plan"
        )
    fingerprint = iter(plan.fingerprint)
    built = [(n, next(fingerprint) if v is ARRAY else v, d) for n, v, d in plan.masking]
    call = masking_entries(spec)
    sizes = [(v, w) for (n, v, _), (_, w, _) in zip(built[:2], call[:2], strict=True)]
    if any(v != w for v, w in sizes):
        (q0, q1), (k0, k1) = sizes
        raise ValueError(
            f"block_plan was built for q_seq={q0}, kv_seq={k0}, but this call has "
            f"q_seq={q1}, kv_seq={k1}"
        )
    preds, messages = [], []
    # The structure comes first: where it matches, both lists have the same entries.
    for (name, mine, digest), (_, theirs, _) in zip(built, call, strict=False):
        if not (eqx.is_array(mine) or eqx.is_array(theirs)):
            if mine != theirs:
                raise ValueError(f"block_plan was built for {_difference(name, mine, theirs)}")
            continue
        with jax.ensure_compile_time_eval():
            differs = jnp.asarray(mine) != jnp.asarray(theirs)
        state = known(differs)
        if state:
            values = "" if digest else _values(name, mine, theirs)
            values = values or f"other {name} values than this call's"
            raise ValueError(f"block_plan was built for {values}")
        if state is None:
            preds.append(differs)
            messages.append(
                f"block_plan was built for other {name} values than this call's (compared "
                "at run time, as they are traced)"
            )
    if not preds:
        return x
    flags = jnp.stack(jnp.broadcast_arrays(*preds))
    return eqx.branched_error_if(x, jnp.any(flags), jnp.argmax(flags), messages)


def _shape(x) -> tuple[int, ...] | None:
    return None if x is None else tuple(x.shape)


def _clipped(length, seq: int):
    return seq if length is None else jnp.clip(length, 0, seq)


def _digest(x: Array) -> UInt32[Array, ""]:
    """A 32-bit digest of `x`'s values and their order (a difference escapes it with a
    probability of about `2**-32`)."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()
    index = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    return jnp.sum(_mix32(bits ^ _mix32(index * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


def _difference(name: str, mine, theirs) -> str:
    """`"<the plan's>, but this call has <the call's>"` for a structural entry."""
    if isinstance(mine, TracedMod) and isinstance(theirs, TracedMod):
        lines = zip(mine.key.splitlines(), theirs.key.splitlines(), strict=False)
        first = next(((a, b) for a, b in lines if a != b), (mine.key, theirs.key))
        a, b = (line.strip() for line in first)
        return f"a different mask_mod: it traces to `{a}`, where this call's traces to `{b}`"
    return f"{_describe(name, mine)}, but this call has {_describe(name, theirs)}"


def _describe(name: str, value) -> str:
    if value is None:
        return f"{name}=None"
    if isinstance(value, TracedMod):
        return f"a {name}"
    if name in _SHAPED:
        return f"{name} of shape {value}"
    return f"{name}={value!r}"


def _values(name: str, mine, theirs) -> str:
    """`"<name>=<the plan's>, but this call has <name>=<the call's>"` where both are
    concrete scalars (not under `vmap`); empty otherwise."""
    try:
        a, b = (np.asarray(v).item() for v in (mine, theirs))
    except Exception:  # a traced value, or a batch of them
        return ""
    return f"{name}={a}, but this call has {name}={b}"


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

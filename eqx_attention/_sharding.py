"""Sequence-parallel (ring) attention over a named mesh axis, on JAX's own SPMD machinery.

Inside `jax.shard_map`, every device holds one slice of the sequence. Each device keeps its
queries and passes its key/value slice around the ring with `jax.lax.ppermute`; after
`n - 1` hops every query has met every key. Each visit is folded into the running softmax
with the chunked kernel's block step (`_blocks.block_forward`), so the arithmetic, masks
and dropout are exactly those of the single-device kernels. The backward pass rings too: the
key/value gradients travel with their key/value slice and arrive home after a last hop.

Positions are global: a device's rows and keys are described by their indices in the whole
(unsharded) sequence, and the shared `AttentionSpec` turns those into masks. Layouts
other than contiguous slices (the load-balanced zig-zag) are therefore only a different
index map.
"""

import dataclasses
import functools
from collections.abc import Hashable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._functional import Length, _prepare, spec_arguments
from ._kernels import BLOCK_K, BLOCK_Q
from ._kernels._blocks import (
    block_backward,
    block_forward,
    finalize,
    init_carry,
    key_grad_accumulators,
    score_mod_params,
    sink_grad,
    spec_cotangent,
    zeros_like_params,
)
from ._kernels._plan import classify, run_plan, visit_lists
from ._mha import MultiheadAttention
from ._spec import AttentionSpec, MaskMod, ScoreMod, replace
from ._vma import vary, varying_axes, vma

LAYOUTS = ("contiguous", "zigzag")


def ring_attention(
    query: Float[Array, "q_seq num_heads qk_size"],
    key: Float[Array, "kv_seq num_kv_heads qk_size"],
    value: Float[Array, "kv_seq num_kv_heads vo_size"],
    *,
    axis_name: Hashable,
    is_causal: bool = False,
    layout: str = "contiguous",
    scale: float | int | None = None,
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
    block_sizes: tuple[int, int] | None = None,
) -> Float[Array, "q_seq num_heads vo_size"]:
    """Sequence-parallel attention of one example whose sequence is sharded over a mesh axis.

    Call it inside `jax.shard_map`, on the *local* slices of one example: the sequence axis
    of `query`, `key`, `value` and the segment ids is split over the `n` devices of
    `axis_name`. Batch with `jax.vmap` inside the `shard_map`, or shard the batch over
    another mesh axis. The result equals [`eqx_attention.dot_product_attention`][] on the
    whole sequence, sliced the same way, and so do its gradients.

    Key/value slices travel around the ring with `jax.lax.ppermute`, one hop per step, and
    are folded into an online softmax; the backward pass is a `jax.custom_vjp` that rings
    again, carrying the key/value gradients with their slice. No device ever holds more than
    its own slice plus one visiting slice, so memory per device is O(seq / n) (the logits are
    computed in `block_sizes` tiles). Blocks that causal or window structure hides entirely
    are skipped, not computed and masked.

    ```python
    import functools

    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("seq",))

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("seq"), out_specs=P("seq"))
    def attend(q, k, v):
        return eqx_attention.ring_attention(q, k, v, axis_name="seq", is_causal=True)

    q, k, v = jax.random.normal(jax.random.key(0), (3, 1024, 8, 64))
    out = attend(q, k, v)  # q: (seq, num_heads, qk_size), split over the devices
    ```

    **Load balancing.** With `is_causal=True` and contiguous slices, device `i` has work on
    `i + 1` of the `n` ring steps, but the ring advances in lockstep, so every step costs as
    much as a full block and causality saves no time. `layout="zigzag"` fixes this: cut the
    sequence into `2n` chunks and give device `i` chunks `i` and `2n - 1 - i`; then on every
    step every device has exactly half a block of visible work, half that of non-causal
    attention.
    Reorder the sequence into that layout with [`eqx_attention.to_zigzag`][] before sharding
    (once, e.g. on token ids and targets in the data pipeline; everything but attention is
    position-wise) and restore it with [`eqx_attention.from_zigzag`][]. Position-dependent
    layers such as rotary embeddings must then be given the reordered positions,
    [`eqx_attention.zigzag_indices`][]. Segment ids belong to tokens and are reordered with
    them; causality, windows, lengths and the positions given to `mask_mod`/`score_mod`
    refer to the original order, which `ring_attention` reconstructs.

    **Arguments:**

    - `query`: this device's slice, `(q_seq, num_heads, qk_size)`; the whole query sequence
      is `n * q_seq` long.
    - `key`, `value`: this device's slices, `(kv_seq, num_kv_heads, qk_size | vo_size)`. GQA
      and MQA work as in `dot_product_attention`.
    - `axis_name`: the mesh axis the sequence is split over.
    - `is_causal`: causal attention over the whole sequence (bottom-right aligned, as in
      `dot_product_attention`, if the query and key sequences differ in length).
    - `layout`: `"contiguous"` (device `i` holds the `i`-th slice) or `"zigzag"` (see above;
      needs an even `q_seq` and `kv_seq`).
    - `scale`, `query_seq_length`, `key_value_seq_length`, `local_window_size`,
      `logit_softcap`, `mask_mod`, `score_mod`, `sinks`, `dropout_p`, `dropout_key`: as in
      `dot_product_attention`, with lengths and positions referring to the whole sequence.
      The same `sinks` and `dropout_key` must be given on every device (the sinks'
      gradient is summed over the ring).
    - `query_segment_ids`, `kv_segment_ids`: this device's slices of the segment ids.
    - `block_sizes`: `(block_q, block_k)` tile of the logits computed at once on a device;
      defaults to the chunked kernel's tiles.

    Dense `bias` and `mask` arrays are not supported: they would be `(seq, seq)`, which is
    what sequence parallelism avoids; express masks with the options above.

    **Returns:**

    This device's slice of the output, `(q_seq, num_heads, vo_size)`, with the dtype of
    `value`.
    """
    try:
        num_devices = jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"ring_attention(axis_name={axis_name!r}) must be called inside a jax.shard_map "
            f"whose mesh has the axis {axis_name!r}, but no such axis is bound"
        ) from None
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got layout={layout!r}")
    chunks = 2 if layout == "zigzag" else 1
    for name, length in (("query", query.shape[0]), ("key", key.shape[0])):
        if length % chunks:
            raise ValueError(
                f"layout='zigzag' needs an even local sequence length, got {name}.shape[0]={length}"
            )
    block_q, block_k = (BLOCK_Q, BLOCK_K) if block_sizes is None else block_sizes
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_sizes must be positive, got block_sizes={(block_q, block_k)}")
    spec, q, k, v, _ = _prepare(query, key, value, num_devices, **spec_arguments(locals()))
    # The spec describes the whole sequence; segment ids are only ever held in slices, so
    # they are compared block by block here and passed to the spec as a block mask instead.
    spec = replace(
        spec,
        q_seq=num_devices * spec.q_seq,
        kv_seq=num_devices * spec.kv_seq,
        q_segment_ids=None,
        kv_segment_ids=None,
    )
    config = _Config(axis_name, num_devices, chunks, block_q, block_k)
    out = _ring(q, k, v, query_segment_ids, kv_segment_ids, spec, config)
    num_kv_heads, group, q_seq, vo_size = out.shape
    out = jnp.transpose(out, (2, 0, 1, 3)).reshape(q_seq, num_kv_heads * group, vo_size)
    return out.astype(value.dtype)


def zigzag_indices(seq_len: int, num_shards: int) -> Int[np.ndarray, " {seq_len}"]:
    """Original positions of the sequence in the load-balanced zig-zag order.

    The sequence is cut into `2 * num_shards` equal chunks and shard `i` gets chunks `i` and
    `2 * num_shards - 1 - i`, so that under causal attention every shard has the same work.
    Use the result as the positions of rotary or learned position embeddings of a reordered
    sequence.

    **Arguments:**

    - `seq_len`: length of the whole sequence; a multiple of `2 * num_shards`.
    - `num_shards`: number of devices the sequence will be split over.

    **Returns:**

    Int array `idx` of shape `(seq_len,)`: element `j` of the reordered sequence is element
    `idx[j]` of the original one.
    """
    if num_shards < 1 or seq_len % (2 * num_shards):
        raise ValueError(
            f"seq_len={seq_len} must be a positive multiple of 2 * num_shards = "
            f"{2 * num_shards} for the zig-zag layout"
        )
    chunk = seq_len // (2 * num_shards)
    order = [(i, 2 * num_shards - 1 - i) for i in range(num_shards)]
    starts = np.array(order).reshape(-1) * chunk
    return (starts[:, None] + np.arange(chunk)[None, :]).reshape(-1).astype(np.int32)


def to_zigzag(x: Array, num_shards: int, *, axis: int = 0) -> Array:
    """Reorder the sequence axis of `x` into the zig-zag layout of `ring_attention`.

    Apply it to the whole sequence before sharding it over `num_shards` devices (see
    [`eqx_attention.ring_attention`][]), or to an array already sharded over a mesh with
    `Explicit` axes, which keeps its sharding; [`eqx_attention.from_zigzag`][] undoes it.

    **Arguments:**

    - `x`: array whose axis `axis` is the sequence, of a length divisible by `2 * num_shards`.
    - `num_shards`: number of devices the sequence will be split over.
    - `axis`: the sequence axis.

    **Returns:**

    `x` with its sequence axis reordered.
    """
    return _reorder(x, zigzag_indices(x.shape[axis], num_shards), axis)


def from_zigzag(x: Array, num_shards: int, *, axis: int = 0) -> Array:
    """Undo [`eqx_attention.to_zigzag`][]: restore the original order of the sequence axis.

    **Arguments:**

    - `x`: array in zig-zag order along `axis`.
    - `num_shards`: the number of shards it was reordered for.
    - `axis`: the sequence axis.

    **Returns:**

    `x` in the original order.
    """
    return _reorder(x, np.argsort(zigzag_indices(x.shape[axis], num_shards)), axis)


def _reorder(x: Array, order: np.ndarray, axis: int) -> Array:
    # A gather on an array sharded over `Explicit` mesh axes must name its output sharding;
    # keeping the input's is what a reordering means (and is the default elsewhere).
    index = (slice(None),) * axis + (order,)
    return x.at[index].get(out_sharding=jax.typeof(x).sharding)


def shard_heads(tree: PyTree, mesh: Mesh, axis_name: str) -> PyTree:
    """Split the heads of every [`eqx_attention.MultiheadAttention`][] in `tree` over a mesh axis.

    Head (tensor) parallelism: each device of `axis_name` holds `1/n` of the heads, i.e. the
    matching rows of the query/key/value projections (and their biases) and columns of the
    output projection. Every other array in `tree` is replicated over the mesh. Under `jit`,
    XLA then computes each head's attention on the device that owns it and sums the output
    projection's partial products with one all-reduce per layer.

    Works outside `jit` (it moves the arrays) and inside (it constrains their sharding),
    like `equinox.filter_shard`. Combine with data parallelism by sharding the batch over
    another axis of the same mesh:

    ```python
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = eqx_attention.MultiheadAttention(8, 64, num_kv_heads=2, key=jax.random.key(0))
    x = jnp.ones((16, 10, 64))  # (batch, seq, dim)

    devices = np.array(jax.devices())
    model_size = 2 if devices.size % 2 == 0 else 1  # a 4 x 2 mesh on 8 devices, 1 x 1 on one
    mesh = Mesh(devices.reshape(-1, model_size), ("data", "model"))
    model = eqx_attention.shard_heads(model, mesh, "model")
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    y = eqx.filter_jit(jax.vmap(model))(x)  # (batch, seq, dim), split like x
    ```

    **Arguments:**

    - `tree`: a model (any pytree) containing `MultiheadAttention` modules.
    - `mesh`: the device mesh.
    - `axis_name`: the mesh axis to split heads over; its size must divide every module's
      `num_kv_heads` (and hence `num_heads`), so that a group of query heads stays with
      its key/value head.

    **Returns:**

    `tree` with its arrays placed (or constrained) on `mesh`.
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    replicated = NamedSharding(mesh, PartitionSpec())

    def shardings(node):
        if isinstance(node, MultiheadAttention):
            return _head_shardings(node, mesh, axis_name, replicated)
        return replicated if eqx.is_array(node) else None

    is_mha = lambda node: isinstance(node, MultiheadAttention)  # noqa: E731
    return eqx.filter_shard(tree, jax.tree.map(shardings, tree, is_leaf=is_mha))


def _head_shardings(mha: MultiheadAttention, mesh: Mesh, axis_name: str, replicated):
    n = mesh.shape[axis_name]
    if mha.num_kv_heads % n:
        raise ValueError(
            f"cannot split num_kv_heads={mha.num_kv_heads} (num_heads={mha.num_heads}) over "
            f"the {n} devices of mesh axis {axis_name!r}"
        )
    # Heads are a contiguous head-major reshape of the projections' outputs, so splitting
    # the output rows n ways hands each device whole heads, and query head group i lands
    # with key/value head i.
    rows = NamedSharding(mesh, PartitionSpec(axis_name))
    cols = NamedSharding(mesh, PartitionSpec(None, axis_name))
    tree = jax.tree.map(lambda x: replicated if eqx.is_array(x) else None, mha)
    for name in ("query_proj", "key_proj", "value_proj"):
        split = eqx.tree_at(lambda lin: lin.weight, getattr(tree, name), rows)
        if split.bias is not None:
            split = eqx.tree_at(lambda lin: lin.bias, split, rows)
        tree = eqx.tree_at(lambda m, name=name: getattr(m, name), tree, split)
    return eqx.tree_at(lambda m: m.output_proj.weight, tree, cols)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of the ring: hashable, so it can be a `custom_vjp` nondiff arg."""

    axis_name: Hashable
    num_devices: int
    chunks: int  # contiguous slices per device: 1 (contiguous) or 2 (zig-zag)
    block_q: int
    block_k: int

    def perm(self):
        return [(i, (i + 1) % self.num_devices) for i in range(self.num_devices)]


class _Tiles:
    """One device's slice cut into tiles of `block` rows, with the global index of each row.

    Each of the `chunks` contiguous runs of the slice is padded separately to whole tiles,
    so no tile straddles two runs and tile bounds stay tight for block skipping. Padding rows
    repeat the run's last index (keeping the bounds) and are marked invalid.
    """

    def __init__(self, length: int, block: int, chunks: int):
        run = length // chunks
        self.num_tiles_per_run = -(-run // block)
        self.block = -(-run // self.num_tiles_per_run)
        self.run, self.chunks = run, chunks
        self.pad = self.num_tiles_per_run * self.block - run
        self.num_tiles = chunks * self.num_tiles_per_run
        valid = np.arange(self.num_tiles_per_run * self.block) < run
        self.valid = np.tile(valid, chunks).reshape(self.num_tiles, self.block)

    def split(self, x: Array, axis: int, mode: str = "constant") -> Array:
        """`(..., length, ...)` -> `(num_tiles, ..., block, ...)`."""
        shape = x.shape[:axis] + (self.chunks, self.run) + x.shape[axis + 1 :]
        x = x.reshape(shape)
        if self.pad:
            widths = [(0, 0)] * x.ndim
            widths[axis + 1] = (0, self.pad)
            x = jnp.pad(x, widths, mode=mode)
        shape = x.shape[:axis] + (self.num_tiles, self.block) + x.shape[axis + 2 :]
        return jnp.moveaxis(x.reshape(shape), axis, 0)

    def merge(self, x: Array, axis: int) -> Array:
        """Inverse of `split`, dropping the padding."""
        x = jnp.moveaxis(x, 0, axis)
        shape = x.shape[:axis] + (self.chunks, -1) + x.shape[axis + 2 :]
        x = jax.lax.slice_in_dim(x.reshape(shape), 0, self.run, axis=axis + 1)
        return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])

    def valid_tiles(self) -> Array | None:
        """Which rows of each tile are real (`None` when there is no padding)."""
        return jnp.asarray(self.valid) if self.pad else None

    def indices(self, device, num_devices: int) -> Int[Array, "tiles block"]:
        """Global indices of the rows held by `device`, tiled (a traced device index is fine)."""
        if self.chunks == 1:
            starts = jnp.stack([device * self.run])
        else:
            starts = jnp.stack([device, 2 * num_devices - 1 - device]) * self.run
        idx = starts[:, None] + jnp.arange(self.run)[None, :]
        return self.split(idx.reshape(-1).astype(jnp.int32), 0, mode="edge")


def _hidden(spec: AttentionSpec, q_idx, kv_idx):
    """Whether causal/window structure hides every pair of a tile, or `None` if it cannot.

    Uses only the tile's index bounds, which come from the device index and never from
    data, so the decision stays un-batched under `jax.vmap` and the skip is real.
    """
    left, right = spec.reach()
    if left is None and right is None:
        return None
    q_first, q_last = spec.q_positions(jnp.min(q_idx)), spec.q_positions(jnp.max(q_idx))
    kv_first, kv_last = jnp.min(kv_idx), jnp.max(kv_idx)
    hidden = jnp.bool_(False)
    if right is not None:
        hidden = hidden | (kv_first > q_last + right)
    if left is not None:
        hidden = hidden | (kv_last < q_first - left)
    return hidden


def _tile_mask(q_seg, kv_seg, kv_valid):
    """Block mask for `spec.visible`: same segment, and not a padding key."""
    mask = None
    if q_seg is not None:
        mask = q_seg[:, None] == kv_seg[None, :]
    if kv_valid is not None:
        valid = kv_valid[None, :]
        mask = valid if mask is None else mask & valid
    return None if mask is None else mask[None, None]


def _skip_or(hidden, compute, operand):
    """`compute(operand)` unless the tile is hidden, in which case `operand` is unchanged."""
    if hidden is None:
        return compute(operand)
    return jax.lax.cond(hidden, lambda x: x, compute, operand)


def _tile_states(spec: AttentionSpec, q_idx, q_seg, kv_idx, kv_seg, kv_valid):
    """The state of every (local query tile, visiting key tile) pair, or `None` when
    causal/window structure alone decides what is hidden.

    Lengths, segment ids and `mask_mod` depend on data: the pairs they hide are skipped
    through compact lists (as in the blockwise kernel's block plan), since under `jax.vmap`
    a `lax.cond` on data would compute both branches. Structure is decided by `_hidden`.
    """
    if spec.only_structural and q_seg is None:
        return None
    flat = [None if x is None else x.reshape(-1) for x in (kv_idx, kv_seg, kv_valid)]

    def row(qi, qs):
        return classify(spec.visible(qi, flat[0], _tile_mask(qs, *flat[1:])), kv_idx.shape[1])

    return jax.vmap(row)(q_idx, q_seg)


def _fold(carry, q_tiles, q_idx, q_seg, k, v, kv_idx, kv_seg, spec, tq: _Tiles, tk: _Tiles):
    """Fold one visiting key/value slice into the running softmax of every query tile."""

    kv_valid = tk.valid_tiles()
    states = _tile_states(spec, q_idx, q_seg, kv_idx, kv_seg, kv_valid)

    def one_query_tile(args):
        carry, q_blk, qi, qs, tiles = args

        def fold_tile(j, needs_mask, carry):
            kvs = None if kv_seg is None else kv_seg[j]
            valid = None if kv_valid is None else kv_valid[j]
            mask = _tile_mask(qs, kvs, valid)
            visible = spec.visible(qi, kv_idx[j], mask) if needs_mask else None
            return block_forward(carry, q_blk, k[j], v[j], spec, qi, kv_idx[j], None, visible)

        if tiles is not None:
            return run_plan(*tiles, fold_tile, carry)

        def step(j, carry):
            compute = functools.partial(fold_tile, j, True)
            return _skip_or(_hidden(spec, qi, kv_idx[j]), compute, carry)

        return jax.lax.fori_loop(0, tk.num_tiles, step, carry)

    tiles = None if states is None else visit_lists(states)
    return jax.lax.map(one_query_tile, (carry, q_tiles, q_idx, q_seg, tiles))


def _forward(q, k, v, q_seg, kv_seg, spec: AttentionSpec, config: _Config):
    axis, n = config.axis_name, config.num_devices
    me = jax.lax.axis_index(axis)
    tq = _Tiles(q.shape[2], config.block_q, config.chunks)
    tk = _Tiles(k.shape[1], config.block_k, config.chunks)
    q_tiles, q_idx = tq.split(q, 2), tq.indices(me, n)
    q_seg = None if q_seg is None else tq.split(q_seg, 0, mode="edge")
    kv = (tk.split(k, 1), tk.split(v, 1), None if kv_seg is None else tk.split(kv_seg, 0))
    carry = jax.vmap(lambda q_blk: init_carry(q_blk, v.shape[-1]))(q_tiles)
    carry = vary(carry, vma(q, k, v))

    def fold(s, carry, kv):
        kv_idx = tk.indices((me - s) % n, n)
        return _fold(carry, q_tiles, q_idx, q_seg, *kv[:2], kv_idx, kv[2], spec, tq, tk)

    def ring_step(s, state):
        carry, kv = state
        # Send the slice on before using it so the transfer can overlap the compute.
        visiting = jax.lax.ppermute(kv, axis, config.perm())
        return fold(s, carry, kv), visiting

    carry, kv = jax.lax.fori_loop(0, n - 1, ring_step, (carry, kv))
    out, lse = jax.vmap(lambda carry: finalize(carry, spec.sinks))(fold(n - 1, carry, kv))
    return tq.merge(out, 2).astype(v.dtype), tq.merge(lse, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ring(q, k, v, q_seg, kv_seg, spec, config):
    return _forward(q, k, v, q_seg, kv_seg, spec, config)[0]


def _ring_fwd(q, k, v, q_seg, kv_seg, spec, config):
    out, lse = _forward(q, k, v, q_seg, kv_seg, spec, config)
    return out, (q, k, v, q_seg, kv_seg, spec, out, lse)


def _ring_bwd(config: _Config, residuals, d_out):
    q, k, v, q_seg, kv_seg, spec, out, lse = residuals
    axis, n = config.axis_name, config.num_devices
    me = jax.lax.axis_index(axis)
    tq = _Tiles(q.shape[2], config.block_q, config.chunks)
    tk = _Tiles(k.shape[1], config.block_k, config.chunks)
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)
    # Padding query rows get a zero output gradient, so they contribute nothing below.
    q_tiles, do_tiles = tq.split(q, 2), tq.split(d_out, 2)
    # Transposed once here: block_backward's key gradients read them in order.
    q_tiles_t, do_tiles_t = jnp.swapaxes(q_tiles, -1, -2), jnp.swapaxes(do_tiles, -1, -2)
    lse_tiles, delta_tiles = tq.split(lse, 2, mode="edge"), tq.split(delta, 2)
    q_idx = tq.indices(me, n)
    q_seg = None if q_seg is None else tq.split(q_seg, 0, mode="edge")
    kv = (tk.split(k, 1), tk.split(v, 1), None if kv_seg is None else tk.split(kv_seg, 0))
    axes = vma(q, k, v, d_out)
    dq = vary(jnp.zeros(q_tiles.shape, jnp.float32), axes)
    dkv = vary((jnp.zeros(kv[0].shape, jnp.float32), jnp.zeros(kv[1].shape, jnp.float32)), axes)
    dmod = vary(zeros_like_params(score_mod_params(spec)[0]), axes)

    def grads(s, dq, dmod, kv):
        """dq contributions from a visiting slice, and that slice's dk, dv from our queries."""
        kv_idx = tk.indices((me - s) % n, n)

        states = _tile_states(spec, q_idx, q_seg, kv_idx, kv[2], tk.valid_tiles())

        def one_kv_tile(acc, xs):
            k_blk, v_blk, kvi, kvs, valid, tiles = xs

            def grad_tile(i, needs_mask, acc):
                dq_i, dmod, dk, dv = acc
                qs = None if q_seg is None else q_seg[i]
                mask = _tile_mask(qs, kvs, valid)
                visible = spec.visible(q_idx[i], kvi, mask) if needs_mask else None
                dq_step, dk_step, dv_step, _, dmod_step = block_backward(
                    q_tiles[i], k_blk, v_blk, do_tiles[i], lse_tiles[i], delta_tiles[i],
                    spec, q_idx[i], kvi, None, visible, q_tiles_t[i], do_tiles_t[i],
                )  # fmt: skip
                dmod = jax.tree.map(jnp.add, dmod, dmod_step)
                return dq_i + dq_step, dmod, dk + dk_step, dv + dv_step

            def visit(i, needs_mask, acc):
                dq, dmod, dk, dv = acc
                # Only this tile's dq passes through a cond: a conditional may copy its
                # operands, and copying all of dq for every tile pair would dominate.
                compute = functools.partial(grad_tile, i, needs_mask)
                operand = (dq[i], dmod, dk, dv)
                hidden = None if tiles is not None else _hidden(spec, q_idx[i], kvi)
                dq_i, dmod, dk, dv = _skip_or(hidden, compute, operand)
                return dq.at[i].set(dq_i), dmod, dk, dv

            carry = (*acc, *vary(key_grad_accumulators(k_blk, v_blk), axes))
            if tiles is not None:
                carry = run_plan(*tiles, visit, carry)
            else:
                carry = jax.lax.fori_loop(0, tq.num_tiles, lambda i, c: visit(i, True, c), carry)
            dq, dmod, dk, dv = carry
            return (dq, dmod), (jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2))

        # The transpose: for each visiting key tile, the local query tiles to visit.
        tiles = None if states is None else visit_lists(states.T)
        xs = (*kv[:2], kv_idx, kv[2], tk.valid_tiles(), tiles)
        return jax.lax.scan(one_kv_tile, (dq, dmod), xs)

    def ring_step(s, state):
        dq, dmod, kv, dkv = state
        visiting = jax.lax.ppermute(kv, axis, config.perm())
        (dq, dmod), (dk, dv) = grads(s, dq, dmod, kv)
        # The gradients travel with their slice: they arrive home one hop after the last use.
        dkv = jax.lax.ppermute((dkv[0] + dk, dkv[1] + dv), axis, config.perm())
        return dq, dmod, visiting, dkv

    dq, dmod, kv, dkv = jax.lax.fori_loop(0, n - 1, ring_step, (dq, dmod, kv, dkv))
    (dq, dmod), (dk, dv) = grads(n - 1, dq, dmod, kv)
    dk, dv = jax.lax.ppermute((dkv[0] + dk, dkv[1] + dv), axis, config.perm())
    dq = tq.merge(dq, 2).astype(q.dtype)
    dk, dv = tk.merge(dk, 1).astype(k.dtype), tk.merge(dv, 1).astype(v.dtype)
    dsinks = None if spec.sinks is None else sink_grad(spec.sinks, lse, delta)
    # Each device has the gradients from its own query rows: parameters the same on every
    # device get the sum (without type checks, `check_vma=False`, shard_map's transpose sums).
    dsinks, dmod = jax.tree.map(
        lambda g, x: (
            jax.lax.psum(g, axis) if axis in varying_axes(g) and axis not in varying_axes(x) else g
        ),
        (dsinks, dmod),
        (spec.sinks, score_mod_params(spec)[0]),
    )
    none = jax.tree.map(lambda _: None, (q_seg, kv_seg))
    return (dq, dk, dv, *none, spec_cotangent(spec, dsinks, dmod))


_ring.defvjp(_ring_fwd, _ring_bwd)

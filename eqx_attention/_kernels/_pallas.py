"""The Pallas kernel for GPUs: FlashAttention-2 over the block plan's lists.

Forward: one program per (query block, key/value head, group chunk) walks the key blocks its
row of the plan lists, full ones first (no mask work at all), then partial ones (masked), with
an online softmax. The query heads that share a key/value head are packed into the rows of
one tile, so each key/value block is read once for the whole chunk of its group.

Backward (FlashAttention-2's split): one program per (key block, key/value head) walks the
plan's transposed lists to accumulate `dk` and `dv` (and the bias's and `score_mod`'s
per-block gradients, written as partial sums that XLA reduces in a fixed order: no atomics);
one program per (query block, key/value head, group chunk) accumulates `dq`.

Every option of the spec is evaluated inside the kernel by the spec's own code
(`_in_kernel.py`): positions, lengths, windows, segment ids, key positions, `mask_mod` and
`score_mod` with their captured arrays, softcap, dense masks and biases read block by block
in their broadcast shapes, dropout by the same counter-based hash as every implementation,
and sinks. On a GPU it lowers through Triton; anywhere else it runs in Pallas interpret mode.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .._spec import AttentionSpec, replace
from ._autodiff import Kernel, attention
from ._blocks import (
    MASKED,
    join_differentiable,
    score_mod_params,
    sink_grad,
    split_differentiable,
)
from ._chunked import _Blockwise, pad_to_blocks
from ._in_kernel import spec_operands, whole
from ._plan import BlockPlan, check_plan, make_plan

# The kernel's tiles (FlashAttention-2's Triton kernels use 64-128 rows by 64 keys on
# Ampere and Hopper). A tile holds BLOCK_Q queries of as many heads of a group as fit in
# MAX_ROWS rows. Unmeasured on a GPU so far: benchmarks/gpu.py is where to tune them.
BLOCK_Q = 64
BLOCK_K = 64
MAX_ROWS = 128
# The block sizes of a plan the kernel takes: Triton's tiles are powers of two, and a tile's
# rows hold at least one head's block of queries.
MIN_BLOCK, MAX_BLOCK = 16, MAX_ROWS
NUM_WARPS = 4
NUM_STAGES = 2
# score_mod's captured float arrays are differentiated inside the kernel through lookups that
# compare each index with every element (a [rows, block_k, size] comparison per block, which
# Triton must hold at once): up to this many elements per array, a power of two. Larger ones
# get their gradient from the blockwise XLA kernel's backward pass, and the automatic rule
# prefers that kernel for them.
MAX_TABLE = 64


def pallas_unsupported(spec: AttentionSpec, decoding: bool = False) -> str | None:
    """Why the automatic rule should not pick the Pallas kernels, or `None` when it should.

    `decoding`: the call runs the decode kernel, whose backward pass goes through the
    reference, so it differentiates captured arrays of any size."""
    if jax.default_backend() != "gpu":
        return (
            f"the Pallas kernel is compiled for GPUs only, this is {jax.default_backend()!r} "
            "(implementation='pallas' runs it in interpret mode, for testing)"
        )
    params, _ = score_mod_params(spec)
    if not decoding and not _tables_in_kernel(jax.tree.leaves(params)):
        sizes = [x.size for x in jax.tree.leaves(params)]
        return (
            f"score_mod captures floating-point arrays of {sizes} elements, which the kernel "
            f"differentiates only up to {MAX_TABLE} elements each, a power of two"
        )
    return None


def _tables_in_kernel(params) -> bool:
    """Whether the kernel differentiates these captured arrays itself."""
    return all(x.size <= MAX_TABLE and x.size & (x.size - 1) == 0 for x in params)


def default_blocks(q_seq: int, kv_seq: int) -> tuple[int, int]:
    """The plan's block sizes for the Pallas kernel: powers of two from 16 up to its tiles."""
    return _fit_block(BLOCK_Q, q_seq), _fit_block(BLOCK_K, kv_seq)


def _fit_block(block: int, length: int) -> int:
    return max(MIN_BLOCK, min(block, pl.next_power_of_2(length)))


def _heads_per_tile(group: int, block_q: int) -> int:
    """How many query heads of a group one tile packs: a power of two dividing the group."""
    n = 1
    while group % (2 * n) == 0 and 2 * n * block_q <= MAX_ROWS:
        n *= 2
    return n


def pallas_attention(q, k, v, spec: AttentionSpec, bias, plan: BlockPlan | None = None):
    """Pad to whole blocks and run the kernel: `(out, lse)` as `chunked_attention` returns."""
    T, S = spec.q_seq, spec.kv_seq
    if plan is None:
        block_q, block_k = default_blocks(T, S)
    else:
        block_q, block_k = plan.grid[2:]
        check_plan(plan, (T, S, block_q, block_k))
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if not MIN_BLOCK <= size <= MAX_BLOCK or size & (size - 1):
                raise ValueError(
                    f"implementation='pallas' needs a block plan whose blocks are powers of two "
                    f"from {MIN_BLOCK} to {MAX_BLOCK}, got {name}={size}: build it with "
                    "make_block_plan(..., block_size=(64, 64))"
                )
    q, k, v, spec, bias = pad_to_blocks(q, k, v, spec, bias, block_q, block_k)
    if plan is None:
        plan = make_plan(spec, block_q, block_k)
    x, aux = split_differentiable(q, k, v, bias, spec)
    out, lse = attention(_Pallas(block_q, block_k), x, (aux, plan))
    return out[:, :, :T], jax.lax.stop_gradient(lse[:, :, :T])


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a kernel sees the padded `[K, G, T, D]` queries: `[K, num_q, chunks, rows, D]`,
    each tile `rows = heads * block_q` rows of `heads` query heads of one group chunk."""

    K: int
    G: int
    Tp: int
    Sp: int
    block_q: int
    block_k: int
    heads: int

    @property
    def chunks(self) -> int:
        return self.G // self.heads

    @property
    def num_q(self) -> int:
        return self.Tp // self.block_q

    @property
    def num_k(self) -> int:
        return self.Sp // self.block_k

    @property
    def rows(self) -> int:
        return self.heads * self.block_q

    def pack(self, x):
        """`[K, G, Tp, ...]` -> `[K, num_q, chunks, rows, ...]`."""
        rest = x.shape[3:]
        x = x.reshape(self.K, self.chunks, self.heads, self.num_q, self.block_q, *rest)
        x = jnp.moveaxis(x, 3, 1)
        return x.reshape(self.K, self.num_q, self.chunks, self.rows, *rest)

    def unpack(self, x):
        rest = x.shape[4:]
        x = x.reshape(self.K, self.num_q, self.chunks, self.heads, self.block_q, *rest)
        x = jnp.moveaxis(x, 1, 3)
        return x.reshape(self.K, self.G, self.Tp, *rest)

    def row_spec(self, x, grid_order):
        """A `BlockSpec` for one tile of a packed array, on a grid of `grid_order`."""
        block = (None, None, None) + tuple(x.shape[3:])

        def index(*ids):
            i, kh, c = (ids[grid_order.index(n)] for n in "ihc")
            return (kh, i, c) + (0,) * (len(x.shape) - 3)

        return pl.BlockSpec(block, index)


def _pad_size(x, axis: int):
    """Pad a head axis with zeros to a power of two of at least 16 (Triton's tile sizes);
    one that is already such a size is read where it lies, never copied."""
    size = x.shape[axis]
    if size >= 16 and size & (size - 1) == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, max(16, pl.next_power_of_2(size)) - size)
    return jnp.pad(x, widths)


def _compiler_params(head_size: int):
    from jax.experimental.pallas import triton as plgpu

    # As JAX's Triton attention kernels: twice the warps for heads wider than 64.
    warps = NUM_WARPS if head_size <= 64 else 2 * NUM_WARPS
    return plgpu.CompilerParams(num_warps=warps, num_stages=NUM_STAGES)


def interpret() -> bool:
    """Whether kernels run in Pallas interpret mode: everywhere but on a GPU (the device the
    computation lands on, whatever `jax.default_backend` is made to say)."""
    return jax.devices()[0].platform != "gpu"


def _call(kernel, grid, in_specs, out_specs, out_shape, name, head_size: int = 128, **kwargs):
    interpreted = interpret()
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpreted,
        compiler_params=None if interpreted else _compiler_params(head_size),
        name=name,
        **kwargs,
    )


class _Tile:
    """One program's view of its tile: rows, their query indices and heads, and the dense
    mask's and bias's blocks in their own broadcast shapes."""

    def __init__(self, layout: _Layout, spec: AttentionSpec, i, kh, c):
        self.layout, self.spec, self.i, self.kh, self.c = layout, spec, i, kh, c
        rows = jnp.arange(layout.rows, dtype=jnp.int32)
        self.q_idx = i * layout.block_q + rows % layout.block_q
        group = c * layout.heads + rows // layout.block_q
        self.group = group
        self.heads = (kh * layout.G + group)[None, None, :, None]

    def dense(self, ref, kv_start):
        """The `[heads|1, block_q|1, block_k|1]` block of a stored `[K|1, G|1, T|1, S|1]`
        mask or bias (never broadcast beyond what is stored)."""
        lay = self.layout
        kh = self.kh if ref.shape[0] > 1 else 0
        g = pl.ds(self.c * lay.heads, lay.heads) if ref.shape[1] > 1 else pl.ds(0, 1)
        t = pl.ds(self.i * lay.block_q, lay.block_q) if ref.shape[2] > 1 else pl.ds(0, 1)
        s = pl.ds(kv_start, lay.block_k) if ref.shape[3] > 1 else pl.ds(0, 1)
        return ref[kh, g, t, s]

    def key_block(self, k_ref, v_ref, bias_ref, block):
        """Key block `block` of this tile's walk: `(start, kv_idx, keys, values, bias)`, the
        bias block `None` without a bias."""
        lay = self.layout
        start = block * lay.block_k
        kv_idx = start + jnp.arange(lay.block_k, dtype=jnp.int32)
        k_blk = k_ref[pl.ds(start, lay.block_k), :]
        v_blk = v_ref[pl.ds(start, lay.block_k), :]
        bias = None if bias_ref is None else self.dense(bias_ref, start)
        return start, kv_idx, k_blk, v_blk, bias

    def as_rows(self, block):
        """A dense block as `[1, 1, rows|1, block_k|1]`, broadcastable against the tile."""
        lay = self.layout
        if block.shape[0] == 1 and block.shape[1] == 1:
            return block[None]
        block = jnp.broadcast_to(block, (lay.heads, lay.block_q, block.shape[2]))
        return block.reshape(1, 1, lay.rows, block.shape[2])

    def scores(self, raw, kv_idx, bias_block, spec=None):
        spec = self.spec if spec is None else spec
        bias = None if bias_block is None else self.as_rows(bias_block)
        return spec.scores(raw[None, None], self.q_idx, kv_idx, bias, self.heads)[0, 0]

    def visible(self, kv_idx, mask_block, padded: bool):
        mask = None if mask_block is None else self.as_rows(mask_block != 0)
        visible = self.spec.visible(self.q_idx, kv_idx, mask)
        if padded:
            real = (kv_idx < self.spec.kv_seq)[None, None, None, :]
            visible = real if visible is None else visible & real
        return (
            None
            if visible is None
            else jnp.broadcast_to(visible[0, 0], (self.layout.rows, kv_idx.shape[0]))
        )

    def keep(self, kv_idx):
        return self.spec.keep(self.q_idx, kv_idx, self.heads)[0, 0]


def _walk(count_ref, index_ref, row, step, carry):
    """Fold `step(block, needs_mask, carry)` over a plan row's full, then partial, blocks."""
    for kind, needs_mask in ((0, False), (1, True)):

        def body(j, carry, kind=kind, needs_mask=needs_mask):
            return step(index_ref[row, kind, j], needs_mask, carry)

        carry = jax.lax.fori_loop(0, count_ref[row, kind], body, carry)
    return carry


def _dot(a, b, trans_b: bool = False):
    """`a @ b` (or `a @ b.T`) accumulated in float32. Float32 inputs run on the tensor cores
    (TF32) under JAX's default matmul precision, as XLA's own products do; a default
    precision of `"highest"` makes them exact."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    highest = jax.config.jax_default_matmul_precision in ("highest", "float32")
    precision = jax.lax.Precision.HIGHEST if highest else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Pallas(Kernel):
    block_q: int
    block_k: int

    @property
    def differentiable(self) -> Kernel:
        # Forward mode and second order differentiate the blockwise XLA kernel over the same
        # plan and padded inputs: it computes the same function, in code JAX can differentiate.
        return _Blockwise((self.block_q, self.block_k, self.block_q, self.block_k))

    def _layout(self, q, k) -> _Layout:
        K, G, Tp, _ = q.shape
        heads = _heads_per_tile(G, self.block_q)
        return _Layout(K, G, Tp, k.shape[1], self.block_q, self.block_k, heads)

    def forward(self, x, aux):
        aux, plan = aux
        q, k, v, bias, spec = join_differentiable(x, aux)
        lay = self._layout(q, k)
        vo_size = v.shape[-1]
        qp, kp, vp = _pad_size(q, 3), _pad_size(k, 2), _pad_size(v, 2)
        sinks, mask = spec.sinks, _as_int8(spec.mask)
        operands, rebuild, _ = spec_operands(replace(spec, sinks=None, mask=None))
        optional = [a for a in (mask, bias, sinks) if a is not None]
        kernel = functools.partial(
            _forward_kernel,
            lay=lay,
            rebuild=rebuild,
            has=(mask is not None, bias is not None, sinks is not None),
            padded=lay.Sp > spec.kv_seq,
            num_spec=len(operands),
        )
        order = "ihc"
        q_packed = lay.pack(qp)
        out_shape = [
            jax.ShapeDtypeStruct(q_packed.shape[:4] + (vp.shape[-1],), v.dtype),
            jax.ShapeDtypeStruct(q_packed.shape[:4], jnp.float32),
        ]
        inputs = [q_packed, kp, vp, plan.kv_count, plan.kv_index, *optional, *operands]
        in_specs = [lay.row_spec(q_packed, order)]
        in_specs += [_head_spec(kp, order), _head_spec(vp, order)]
        in_specs += [whole(a) for a in inputs[3:]]
        out, lse = _call(
            kernel,
            (lay.num_q, lay.K, lay.chunks),
            in_specs,
            [lay.row_spec(s, order) for s in out_shape],
            out_shape,
            "eqx_attention_forward",
            head_size=max(qp.shape[-1], vp.shape[-1]),
        )(*inputs)
        return lay.unpack(out)[..., :vo_size], lay.unpack(lse)

    def backward(self, x, aux, out, lse, ct_out, ct_lse):
        aux, plan = aux
        q, k, v, bias, spec = join_differentiable(x, aux)
        lay = self._layout(q, k)
        d_out = ct_out.astype(jnp.float32)
        delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1) - ct_lse
        qp, kp, vp = _pad_size(q, 3), _pad_size(k, 2), _pad_size(v, 2)
        d_out_p = _pad_size(ct_out.astype(v.dtype), 3)
        mask = _as_int8(spec.mask)
        operands, rebuild, param_at = spec_operands(replace(spec, sinks=None, mask=None))
        params = [operands[n] for n in param_at]
        in_kernel = _tables_in_kernel(params)
        if not in_kernel:
            param_at, params = [], []
        has = (mask is not None, bias is not None)
        optional = [a for a in (mask, bias) if a is not None]
        rows = [lay.pack(a) for a in (qp, d_out_p, lse, delta)]
        common = dict(
            lay=lay,
            rebuild=rebuild,
            has=has,
            padded=lay.Sp > spec.kv_seq,
            num_spec=len(operands),
            param_at=tuple(param_at),
        )

        # dk, dv, and the per-block partial gradients of the bias and score_mod's arrays.
        dbias0 = None
        if bias is not None:
            # A bias with no key axis collects every key block's gradient: one partial each.
            partials = lay.num_k if bias.shape[3] == 1 else 1
            dbias0 = jnp.zeros((partials, lay.K) + bias.shape[1:], jnp.float32)
        order = "jh"
        inputs = [*rows, kp, vp, plan.q_count, plan.q_index, *optional, *operands]
        in_specs = [whole(a) for a in inputs[:4]]
        in_specs += [_head_spec(kp, order), _head_spec(vp, order)]
        in_specs += [whole(a) for a in inputs[6:]]
        out_shape = [
            jax.ShapeDtypeStruct((lay.K, lay.Sp, kp.shape[-1]), k.dtype),
            jax.ShapeDtypeStruct((lay.K, lay.Sp, vp.shape[-1]), v.dtype),
        ]
        out_specs = [_head_block_spec(s, lay.block_k) for s in out_shape]
        aliases = {}
        if dbias0 is not None:
            aliases[len(inputs)] = len(out_shape)
            inputs.append(dbias0)
            in_specs.append(whole(dbias0))
            out_shape.append(jax.ShapeDtypeStruct(dbias0.shape, dbias0.dtype))
            out_specs.append(whole(dbias0))
        for p in params:
            shape = (lay.num_k, lay.K) + p.shape
            out_shape.append(jax.ShapeDtypeStruct(shape, jnp.float32))
            out_specs.append(pl.BlockSpec((None, None) + p.shape, _slot(p.ndim)))
        grads = _call(
            functools.partial(_dkdv_kernel, **common, num_params=len(params)),
            (lay.num_k, lay.K),
            in_specs,
            out_specs,
            out_shape,
            "eqx_attention_backward_dkdv",
            head_size=max(qp.shape[-1], vp.shape[-1]),
            input_output_aliases=aliases,
        )(*inputs)
        dk, dv = grads[0][..., : k.shape[-1]], grads[1][..., : v.shape[-1]]
        rest = list(grads[2:])
        dbias = None
        if bias is not None:
            dbias = jnp.sum(rest.pop(0), axis=0)
            dbias = dbias if bias.shape[0] > 1 else jnp.sum(dbias, axis=0, keepdims=True)
        dparams = [jnp.sum(g, axis=(0, 1)) for g in rest]

        # dq.
        order = "ihc"
        inputs = [*rows, kp, vp, plan.kv_count, plan.kv_index, *optional, *operands]
        in_specs = [lay.row_spec(a, order) for a in inputs[:4]]
        in_specs += [_head_spec(kp, order), _head_spec(vp, order)]
        in_specs += [whole(a) for a in inputs[6:]]
        dq_shape = jax.ShapeDtypeStruct(rows[0].shape, q.dtype)
        dq = _call(
            functools.partial(_dq_kernel, **common),
            (lay.num_q, lay.K, lay.chunks),
            in_specs,
            lay.row_spec(dq_shape, order),
            dq_shape,
            "eqx_attention_backward_dq",
            head_size=max(qp.shape[-1], vp.shape[-1]),
        )(*inputs)
        dq = lay.unpack(dq)[..., : q.shape[-1]]

        dsinks = None if spec.sinks is None else sink_grad(spec.sinks, lse, delta)
        params_tree, _ = score_mod_params(spec)
        if in_kernel:
            dmod = jax.tree.unflatten(jax.tree.structure(params_tree), dparams)
        else:
            # Arrays too large to compare every index with: the blockwise kernel's backward
            # pass sums their gradient block by block (and recomputes the rest, unused).
            blockwise = self.differentiable.backward(x, (aux, plan), out, lse, ct_out, ct_lse)
            dmod = blockwise[5]
        grads = (dq, dk, dv, dbias, dsinks, dmod)
        return jax.tree.map(lambda g, x: g.astype(x.dtype), grads, x)


def _as_int8(mask):
    # Triton reads no booleans from memory: the dense mask travels as bytes.
    return None if mask is None else mask.astype(jnp.int8)


def _head_spec(x, grid_order):
    """Every program gets the whole sequence of its key/value head."""

    def index(*ids):
        return (ids[grid_order.index("h")], 0, 0)

    return pl.BlockSpec((None,) + x.shape[1:], index)


def _head_block_spec(shape, block_k):
    return pl.BlockSpec((None, block_k, shape.shape[-1]), lambda j, kh: (kh, j, 0))


def _slot(ndim):
    return lambda j, kh: (j, kh) + (0,) * ndim


def _split_refs(refs, has, num_spec):
    """`(optional refs by presence, spec refs, rest)` from a kernel's trailing refs."""
    optional = []
    for present in has:
        optional.append(refs[0] if present else None)
        refs = refs[1:] if present else refs
    return optional, refs[:num_spec], refs[num_spec:]


def init_rows(rows: int, vo_size: int):
    """A tile's fresh online-softmax state: running max, normaliser, unnormalised output."""
    return (
        jnp.full((rows,), MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, vo_size), jnp.float32),
    )


def fold_block(carry, s, v_blk, keep=None, dropout_p=None):
    """Fold a key block's `[rows, block_k]` scores (hidden ones `MASKED`) and its values into
    a tile's online softmax; `keep` is dropout's keep-mask where `dropout_p` is set."""
    m, denom, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new > MASKED, m_new, 0.0)
    correction = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    denom = denom * correction + jnp.sum(p, axis=-1)
    if dropout_p is not None:
        p = jnp.where(keep, p / (1 - dropout_p), 0.0)
    acc = acc * correction[:, None] + _dot(p.astype(v_blk.dtype), v_blk)
    return m_new, denom, acc


def write_rows(out_ref, lse_ref, carry):
    """Store a tile's normalised output and log-sum-exp; rows that saw no key get zeros
    and `MASKED`."""
    m, denom, acc = carry
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out_ref[...] = (acc / safe[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), MASKED)


def _forward_kernel(
    q_ref, k_ref, v_ref, count_ref, index_ref, *refs, lay, rebuild, has, padded, num_spec
):
    (mask_ref, bias_ref, sinks_ref), spec_refs, (out_ref, lse_ref) = _split_refs(
        refs, has, num_spec
    )
    i, kh, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    spec = rebuild(spec_refs)
    tile = _Tile(lay, spec, i, kh, c)
    q = q_ref[...]

    def step(block, needs_mask, carry):
        start, kv_idx, k_blk, v_blk, bias = tile.key_block(k_ref, v_ref, bias_ref, block)
        s = tile.scores(_dot(q, k_blk, trans_b=True), kv_idx, bias)
        if needs_mask:
            mask = None if mask_ref is None else tile.dense(mask_ref, start)
            visible = tile.visible(kv_idx, mask, padded)
            if visible is not None:
                s = jnp.where(visible, s, MASKED)
        keep = None if spec.dropout_p is None else tile.keep(kv_idx)
        return fold_block(carry, s, v_blk, keep, spec.dropout_p)

    m, denom, acc = _walk(count_ref, index_ref, i, step, init_rows(lay.rows, v_ref.shape[-1]))
    if sinks_ref is not None:
        # The sink: one more key with a zero value, folded in last.
        sink = sinks_ref[kh, tile.group]
        m_new = jnp.maximum(m, sink)
        m_safe = jnp.where(m_new > MASKED, m_new, 0.0)
        correction = jnp.exp(m - m_safe)
        denom = denom * correction + jnp.exp(sink - m_safe)
        m, acc = m_new, acc * correction[:, None]
    write_rows(out_ref, lse_ref, (m, denom, acc))


def _block_grads(tile: _Tile, spec, rebuild, spec_refs, param_at, q, k_blk, v_blk, d_out, lse,
                 delta, kv_idx, bias, mask, needs_mask: bool, padded: bool):  # fmt: skip
    """One (tile, key block) pair of the backward pass: `(ds, dp_v, p_dropped, dbias,
    dparams)`, where `ds` is the gradient of the raw logits `q k^T`."""
    values = {n: spec_refs[n][...] for n in param_at}

    def scores(raw, bias, values):
        local = rebuild(spec_refs, values) if values else spec
        return tile.scores(raw, kv_idx, bias, local)

    s, scores_vjp = jax.vjp(scores, _dot(q, k_blk, trans_b=True), bias, values)
    visible = tile.visible(kv_idx, mask, padded) if needs_mask else None
    lse = lse[:, None]
    if visible is None:
        p = jnp.exp(s - lse)
    else:
        p = jnp.where(visible, jnp.exp(jnp.where(visible, s, lse) - lse), 0.0)
    dp = _dot(d_out, v_blk, trans_b=True)
    p_dropped = p
    if spec.dropout_p is not None:
        keep = tile.keep(kv_idx)
        p_dropped = jnp.where(keep, p / (1 - spec.dropout_p), 0.0)
        dp = jnp.where(keep, dp / (1 - spec.dropout_p), 0.0)
    ds, dbias, dvalues = scores_vjp(p * (dp - delta[:, None]))
    return ds, p_dropped, dbias, [dvalues[n] for n in param_at]


def _dkdv_kernel(
    q_ref, d_out_ref, lse_ref, delta_ref, k_ref, v_ref, count_ref, index_ref, *refs,
    lay, rebuild, has, padded, num_spec, param_at, num_params,
):  # fmt: skip
    (mask_ref, bias_ref), spec_refs, outs = _split_refs(refs, has, num_spec)
    if bias_ref is not None:
        outs = outs[1:]  # the aliased zeros of the bias gradient
    dk_ref, dv_ref, *outs = outs
    dbias_ref = outs.pop(0) if bias_ref is not None else None
    dparam_refs = outs
    j, kh = pl.program_id(0), pl.program_id(1)
    spec = rebuild(spec_refs)
    start = j * lay.block_k
    kv_idx = start + jnp.arange(lay.block_k, dtype=jnp.int32)
    k_blk = k_ref[pl.ds(start, lay.block_k), :]
    v_blk = v_ref[pl.ds(start, lay.block_k), :]
    bias_shape = None if bias_ref is None else bias_ref.shape[2:]  # [G|1, T|1, S|1]

    def visit(i, needs_mask, carry):
        dk, dv, dparams = carry
        dbias_i = None
        for c in range(lay.chunks):
            tile = _Tile(lay, spec, i, kh, c)
            q, d_out, lse, delta = (r[kh, i, c] for r in (q_ref, d_out_ref, lse_ref, delta_ref))
            bias = None if bias_ref is None else tile.dense(bias_ref, start)
            mask = None if mask_ref is None or not needs_mask else tile.dense(mask_ref, start)
            ds, p, dbias, dvalues = _block_grads(
                tile, spec, rebuild, spec_refs, param_at, q, k_blk, v_blk, d_out, lse, delta,
                kv_idx, bias, mask, needs_mask, padded,
            )  # fmt: skip
            dv = dv + _dot(p.T.astype(d_out.dtype), d_out)
            dk = dk + _dot(ds.T.astype(q.dtype), q)
            dparams = [a + g for a, g in zip(dparams, dvalues, strict=True)]
            if dbias is not None and bias_shape[0] > 1:
                _write_bias(dbias_ref, dbias, kh, i, c, j, lay)
            elif dbias is not None:
                # A bias shared by the group's heads sums the chunks' gradients first.
                dbias_i = dbias if dbias_i is None else dbias_i + dbias
        if dbias_i is not None:
            _write_bias(dbias_ref, dbias_i, kh, i, 0, j, lay)
        return dk, dv, dparams

    carry = (
        jnp.zeros((lay.block_k, k_ref.shape[-1]), jnp.float32),
        jnp.zeros((lay.block_k, v_ref.shape[-1]), jnp.float32),
        [jnp.zeros(dparam_refs[n].shape, jnp.float32) for n in range(num_params)],
    )
    dk, dv, dparams = _walk(count_ref, index_ref, j, visit, carry)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    for ref, g in zip(dparam_refs, dparams, strict=True):
        ref[...] = g


def _write_bias(ref, grad, kh, i, c, j, lay):
    """Add tile `(i, c)`'s `[heads|1, block_q|1, block_k|1]` bias gradient for key block `j`
    into the partial sums `[partials, K, G|1, T|1, S|1]`.

    Every program owns its own region: its key block's columns, or for a bias without a key
    axis its own partial (`partials` is then the number of key blocks), so no two programs
    add into the same place. A bias without a query axis collects each query block's
    gradient in turn, within its one program.
    """
    _, _, *shape = ref.shape
    partial = j if ref.shape[0] > 1 else 0
    g = pl.ds(c * lay.heads, lay.heads) if shape[0] > 1 else pl.ds(0, 1)
    t = pl.ds(i * lay.block_q, lay.block_q) if shape[1] > 1 else pl.ds(0, 1)
    s = pl.ds(j * lay.block_k, lay.block_k) if shape[2] > 1 else pl.ds(0, 1)
    index = (partial, kh, g, t, s)
    ref[index] = ref[index] + grad


def _dq_kernel(
    q_ref, d_out_ref, lse_ref, delta_ref, k_ref, v_ref, count_ref, index_ref, *refs,
    lay, rebuild, has, padded, num_spec, param_at,
):  # fmt: skip
    (mask_ref, bias_ref), spec_refs, (dq_ref,) = _split_refs(refs, has, num_spec)
    i, kh, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    spec = rebuild(spec_refs)
    tile = _Tile(lay, spec, i, kh, c)
    q, d_out, lse, delta = (r[...] for r in (q_ref, d_out_ref, lse_ref, delta_ref))

    def step(block, needs_mask, dq):
        start, kv_idx, k_blk, v_blk, bias = tile.key_block(k_ref, v_ref, bias_ref, block)
        mask = None if mask_ref is None or not needs_mask else tile.dense(mask_ref, start)
        ds, *_ = _block_grads(
            tile, spec, rebuild, spec_refs, (), q, k_blk, v_blk, d_out, lse, delta, kv_idx,
            bias, mask, needs_mask, padded,
        )  # fmt: skip
        return dq + _dot(ds.astype(k_blk.dtype), k_blk)

    dq = _walk(count_ref, index_ref, i, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)

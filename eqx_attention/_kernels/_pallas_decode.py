"""The Pallas decode kernel for GPUs: split-K (flash-decoding) over the head-major cache.

A decoding step reads every visible key and value once and does two flops per byte, so its
floor is memory bandwidth. The kernel is laid out to reach it:

- **GQA packing.** The `G` query heads times `T` queries of one key/value head share a
  tile's rows (`G * T`, padded to a power of two of at least 16), so each key/value block
  is read once for the whole group. A group too large for one tile (`MAX_ROWS`) is split
  into chunks of heads, each its own program.
- **Split-K.** One program per (key/value head, chunk, split): the visible key blocks of an
  example, `[lo, hi)` from `_key_blocks` (filled length, window, causal end,
  `query_offset`; every slot with `key_positions`), are dealt out to the splits in equal
  runs, and each program folds its run into an online softmax. The splits' normalised
  outputs and log-sum-exps are merged outside the kernel by log-sum-exp, where the sinks
  join as one more term (as `finalize` folds them in). `jax.vmap` adds a batch axis to the
  grid, and each example reads only its own range.
- **Nothing outside the range is read**, and the cache is never padded or copied: the last
  block is shifted back to end at the last slot, as in `_decode.py`, and the keys it
  re-reads are hidden. (A head size that is not a power of two of at least 16 is padded,
  as the training kernel pads it: Triton's tiles are powers of two.)

Every option of the spec runs inside the kernel by the spec's own code (`_in_kernel.py`):
lengths, windows, positions, `mask_mod` and `score_mod` with their captured arrays,
softcap, segment ids, dropout, and dense masks and biases (packed into the tile's rows
outside the kernel when they vary over heads or queries; key-padding columns are read as
they lie). Rows that see no key output zeros.

The backward pass (rare when decoding) recomputes through the materialising reference,
whose logits are only `q_seq` rows, as the XLA decode loop's does; forward mode and second
order differentiate that loop (`_decode._Decode`), which computes the same function.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .._spec import AttentionSpec, replace
from . import _pallas
from ._autodiff import Kernel, attention
from ._blocks import MASKED, join_differentiable, split_differentiable
from ._decode import _Decode, _key_blocks
from ._in_kernel import spec_operands, whole

# Keys per block: a block of 128 bfloat16 keys of size 128 is 32 KiB, the size JAX's Pallas
# GQA decode kernel streams. Unmeasured on a GPU so far: benchmarks/gpu_decode.py is where
# to tune it.
BLOCK_K = 128
# Rows of a tile (query heads of a group times queries) before the group is split in chunks.
MAX_ROWS = 128
# Enough programs to fill a GPU for a batch of one: an H100 or H200 has 132 SMs. A batch of
# B examples runs B times as many programs, which the GPU schedules in waves.
NUM_SMS = 132
# A split walks at least this many blocks, so that a short range is not cut into runs whose
# merge costs more than their reads.
MIN_BLOCKS_PER_SPLIT = 4
# Programs compile with the training kernel's warps and stages (`_pallas._call`): 4 and 2,
# as JAX's Pallas decode kernel does.


def num_splits(num_blocks: int, programs: int) -> int:
    """How many splits the key blocks are dealt to: enough that `programs` (key/value heads
    times chunks) times splits fill `NUM_SMS`, each split walking at least
    `MIN_BLOCKS_PER_SPLIT` of the buffer's `num_blocks` blocks.

    A static function of the buffer, not of how much of it is filled: within it, an example's
    visible blocks are dealt out to the splits at run time, so a short range leaves the last
    splits with nothing to read (they exit at once).
    """
    wanted = -(-NUM_SMS // programs)
    return max(1, min(wanted, num_blocks // MIN_BLOCKS_PER_SPLIT))


def pallas_decode_attention(q, k, v, spec: AttentionSpec, bias, block_k: int | None = None):
    """`(out, lse)` of at most a few queries `q [K, G, T, D]` over `k [K, S, D]` and
    `v [K, S, Dv]`, as `decode_attention` returns them (the log-sum-exp carries no
    gradient). `block_k` defaults to `BLOCK_K`; it is made a power of two of at least 16,
    and no longer than the buffer unless that is shorter than 16."""
    S = spec.kv_seq
    block_k = BLOCK_K if block_k is None else block_k
    block_k = max(16, min(pl.next_power_of_2(block_k), _floor_power_of_2(S)))
    x, aux = split_differentiable(q, k, v, bias, spec)
    out, lse = attention(_PallasDecode(block_k, min(block_k, S)), x, aux)
    return out, jax.lax.stop_gradient(lse)


def _floor_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """How tiles hold a group's `[G, T]` queries: `[K, chunks, rows]`, each chunk's rows
    `heads` query heads of `T` queries each (head-major), padded to `rows`."""

    K: int
    G: int
    T: int
    heads: int

    @classmethod
    def fit(cls, K: int, G: int, T: int) -> "_Rows":
        """The most heads of the group (a divisor of it) whose queries fit in `MAX_ROWS`."""
        heads = max(h for h in range(1, G + 1) if G % h == 0 and (h == 1 or h * T <= MAX_ROWS))
        return cls(K, G, T, heads)

    @property
    def chunks(self) -> int:
        return self.G // self.heads

    @property
    def used(self) -> int:
        return self.heads * self.T

    @property
    def rows(self) -> int:
        return max(16, pl.next_power_of_2(self.used))

    def pack(self, x):
        """`[K|1, G, T, ...]` -> `[K|1, chunks, rows, ...]`, zeros in the padding rows."""
        rest = x.shape[3:]
        x = x.reshape(x.shape[0], self.chunks, self.used, *rest)
        return jnp.pad(x, [(0, 0), (0, 0), (0, self.rows - self.used)] + [(0, 0)] * len(rest))

    def unpack(self, x):
        """`[K, chunks, splits, rows, ...]` -> `[splits, K, G, T, ...]`."""
        splits, rest = x.shape[2], x.shape[4:]
        x = x[:, :, :, : self.used].reshape(self.K, self.chunks, splits, self.heads, self.T, *rest)
        return jnp.moveaxis(x, 2, 0).reshape(splits, self.K, self.G, self.T, *rest)

    def indices(self, kh, c):
        """Each row's query index and query head (padding rows repeat the chunk's last real
        one, so that every lookup stays in range), the heads shaped for the spec."""
        r = jnp.minimum(jnp.arange(self.rows, dtype=jnp.int32), self.used - 1)
        head = kh * self.G + c * self.heads + r // self.T
        return r % self.T, head[None, None, :, None]


def _pack_dense(arr, lay: _Rows, pad_to: int):
    """A stored `[K|1, G|1, T|1, S|1]` mask or bias as `[K|1, chunks|1, rows|1, S|1]`: key
    columns alone stay as they lie; anything that varies over heads or queries is packed
    into the tiles' rows. A key axis is padded to `pad_to` slots (only for a buffer shorter
    than one block)."""
    if arr is None:
        return None
    if arr.shape[1] > 1 or arr.shape[2] > 1:
        arr = lay.pack(jnp.broadcast_to(arr, (arr.shape[0], lay.G, lay.T, arr.shape[3])))
    if arr.shape[3] > 1 and pad_to > arr.shape[3]:
        arr = jnp.pad(arr, [(0, 0)] * 3 + [(0, pad_to - arr.shape[3])])
    return arr


def _forward(q, k, v, bias, spec: AttentionSpec, block_k: int):
    K, G, T, _ = q.shape
    S, vo_size = spec.kv_seq, v.shape[-1]
    lay = _Rows.fit(K, G, T)
    # Only a buffer shorter than one block (under 16 slots) is padded to one.
    Sp = max(S, block_k)
    qp, kp, vp = _pallas._pad_size(q, 3), _pallas._pad_size(k, 2), _pallas._pad_size(v, 2)
    if Sp > S:
        kp, vp = (jnp.pad(a, [(0, 0), (0, Sp - S), (0, 0)]) for a in (kp, vp))
    splits = num_splits(-(-Sp // block_k), K * lay.chunks)
    lo, hi = _key_blocks(spec, block_k)
    bounds = jnp.stack([jnp.asarray(lo), jnp.asarray(hi)]).astype(jnp.int32)
    mask = _pack_dense(_pallas._as_int8(spec.mask), lay, Sp)
    bias = _pack_dense(bias, lay, Sp)
    operands, rebuild, _ = spec_operands(replace(spec, sinks=None, mask=None))
    optional = [a for a in (mask, bias) if a is not None]
    kernel = functools.partial(
        _kernel,
        lay=lay,
        rebuild=rebuild,
        has=(mask is not None, bias is not None),
        num_spec=len(operands),
        splits=splits,
        block_k=block_k,
        kv_seq=S,
    )
    q_packed = lay.pack(qp)
    out_shape = [
        jax.ShapeDtypeStruct((K, lay.chunks, splits, lay.rows, vp.shape[-1]), jnp.float32),
        jax.ShapeDtypeStruct((K, lay.chunks, splits, lay.rows), jnp.float32),
    ]
    inputs = [q_packed, kp, vp, bounds, *optional, *operands]
    in_specs = [
        pl.BlockSpec((None, None) + q_packed.shape[2:], lambda h, c, j: (h, c, 0, 0)),
        pl.BlockSpec((None,) + kp.shape[1:], lambda h, c, j: (h, 0, 0)),
        pl.BlockSpec((None,) + vp.shape[1:], lambda h, c, j: (h, 0, 0)),
    ]
    in_specs += [whole(a) for a in inputs[3:]]
    out_specs = [
        pl.BlockSpec((None, None, None, lay.rows, vp.shape[-1]), lambda h, c, j: (h, c, j, 0, 0)),
        pl.BlockSpec((None, None, None, lay.rows), lambda h, c, j: (h, c, j, 0)),
    ]
    parts, lses = _pallas._call(
        kernel, (K, lay.chunks, splits), in_specs, out_specs, out_shape, "eqx_attention_decode"
    )(*inputs)
    out, lse = _merge(lay.unpack(parts)[..., :vo_size], lay.unpack(lses), spec.sinks)
    return out.astype(v.dtype), lse


def _merge(parts, lses, sinks):
    """The splits' normalised outputs `[splits, K, G, T, Dv]` and log-sum-exps merged by
    log-sum-exp, with the sinks as one more term (a zero value), as `finalize` folds them."""
    m = jnp.max(lses, axis=0)
    if sinks is not None:
        sink = jnp.broadcast_to(sinks[..., None], m.shape)
        m = jnp.maximum(m, sink)
    m_safe = jnp.where(m > MASKED, m, 0.0)
    # A split that saw no key has lse = MASKED: exp(MASKED - m_safe) is exactly zero.
    weights = jnp.exp(lses - m_safe)
    denom = jnp.sum(weights, axis=0)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m_safe)
    out = jnp.sum(weights[..., None] * parts, axis=0)
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    return out / safe[..., None], jnp.where(seen, m_safe + jnp.log(safe), MASKED)


def _dense(ref, kh, c, start, block_k: int):
    """The `[rows|1, block_k|1]` block of a packed `[K|1, chunks|1, rows|1, S|1]` mask or
    bias, never broadcast beyond what is stored."""
    if ref is None:
        return None
    h = kh if ref.shape[0] > 1 else 0
    c = c if ref.shape[1] > 1 else 0
    s = pl.ds(start, block_k) if ref.shape[3] > 1 else pl.ds(0, 1)
    return ref[h, c, pl.ds(0, ref.shape[2]), s]


def _kernel(
    q_ref, k_ref, v_ref, bounds_ref, *refs, lay, rebuild, has, num_spec, splits, block_k, kv_seq
):
    (mask_ref, bias_ref), spec_refs, (out_ref, lse_ref) = _pallas._split_refs(refs, has, num_spec)
    kh, c, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    spec = rebuild(spec_refs)
    q_idx, heads = lay.indices(kh, c)
    q = q_ref[...]
    Sp = k_ref.shape[0]
    # This split's equal share of the example's visible blocks.
    lo, hi = bounds_ref[0], bounds_ref[1]
    per = (jnp.maximum(hi - lo, 0) + splits - 1) // splits
    first = lo + j * per
    last = jnp.minimum(first + per, hi)

    def step(b, carry):
        # The last block is shifted back to end at the last slot (no padding, which would
        # copy the cache); the keys it shares with the block before are hidden.
        start = jnp.minimum(b * block_k, Sp - block_k)
        kv_idx = start + jnp.arange(block_k, dtype=jnp.int32)
        k_blk = k_ref[pl.ds(start, block_k), :]
        v_blk = v_ref[pl.ds(start, block_k), :]
        bias = _dense(bias_ref, kh, c, start, block_k)
        bias = None if bias is None else bias[None, None]
        s = spec.scores(
            _pallas._dot(q, k_blk, trans_b=True)[None, None], q_idx, kv_idx, bias, heads
        )
        mask = _dense(mask_ref, kh, c, start, block_k)
        visible = spec.visible(q_idx, kv_idx, None if mask is None else (mask != 0)[None, None])
        fresh = kv_idx >= b * block_k
        if Sp > kv_seq:
            fresh = fresh & (kv_idx < kv_seq)
        fresh = fresh[None, :]
        visible = fresh if visible is None else visible[0, 0] & fresh
        s = jnp.where(visible, s[0, 0], MASKED)
        keep = None if spec.dropout_p is None else spec.keep(q_idx, kv_idx, heads)[0, 0]
        return _pallas.fold_block(carry, s, v_blk, keep, spec.dropout_p)

    carry = _pallas.init_rows(lay.rows, v_ref.shape[-1])
    _pallas.write_rows(out_ref, lse_ref, jax.lax.fori_loop(first, last, step, carry))


@dataclasses.dataclass(frozen=True)
class _PallasDecode(Kernel):
    block_k: int
    # The XLA decode loop's block: at most the buffer's length.
    loop_block_k: int

    @property
    def differentiable(self) -> Kernel:
        # The XLA decode loop computes the same function in code JAX can differentiate.
        return _Decode(self.loop_block_k)

    def forward(self, x, aux):
        q, k, v, bias, spec = join_differentiable(x, aux)
        return _forward(q, k, v, bias, spec, self.block_k)

    def backward(self, x, aux, out, lse, ct_out, ct_lse):
        # Through the materialising reference, as the XLA loop's: its logits are q_seq rows.
        return self.differentiable.backward(x, aux, out, lse, ct_out, ct_lse)

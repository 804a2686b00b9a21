"""The one description of how logits become attention probabilities.

Every implementation (the materialising `"xla"` reference, the blockwise `"chunked"` kernel
and ring attention) evaluates masks, score modifications and dropout through an
[`AttentionSpec`][] on index ranges, so they cannot drift apart. A block of queries and keys
is described by the *row* indices of its queries (`0..q_seq-1`) and the indices of its keys
(`0..kv_seq-1`); the spec turns those into positions, masks and keep-masks on demand, so no
`[q_seq, kv_seq]` array exists unless the user passed one.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from equinox.internal import unvmap_any, unvmap_max
from jaxtyping import Array, Bool, Float, Int, UInt32

from ._vma import eval_jaxpr, vary

# A (left, right) window: a query at position p may see keys in [p - left, p + right].
Window = tuple[int, int]

# FlexAttention-style hooks, elementwise: `q_pos` and `kv_pos` are the positions of the
# position model (see `AttentionSpec`), `head` is the query head index.
MaskMod = Callable[[Array, Array], Array]
ScoreMod = Callable[[Array, Array, Array, Array], Array]


class TracedMod:
    """A mod's jaxpr as a static field: equal to (and hashed like) any jaxpr that prints the
    same, that is with the same equations, literals, and shapes and dtypes of its constants.

    A mod is traced again in every call (`as_data`): compared by identity, the jaxpr would
    make every call's spec new to the kernels' `jit` caches, and every call compile again.
    The constants' values are leaves beside it ([`DataMod`][]`.consts`), so two mods that
    differ only in the arrays they capture share one compiled kernel. Functions held in its
    equations' parameters (a `custom_jvp` rule) print by name: two mods whose equations are
    the same but for a derivative rule of the same name are taken to be the same.
    """

    def __init__(self, jaxpr: jax.extend.core.Jaxpr):
        self.jaxpr = jaxpr
        self._key = None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = str(self.jaxpr)
        return self._key

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, TracedMod) and (self is other or self.key == other.key)

    def __repr__(self) -> str:
        return f"TracedMod({self.key})"


class DataMod(eqx.Module):
    """A mod whose captured arrays are leaves (`consts`), so they trace like any input.

    `traced` is the mod traced once on scalars, with every captured array (a tracer of any
    transformation, learned or not) and every array constant it builds (NumPy arrays,
    `jnp.asarray` of them) lifted into `consts`: it refers to no traced value, so it can be a
    static field, and it compares by structure ([`TracedMod`][]). `num_positions`, when set,
    is the number of positions the mod is defined on (a ready-made mod's arrays' length).
    """

    traced: TracedMod = eqx.field(static=True)
    consts: tuple[Array, ...]
    num_positions: int | None = eqx.field(static=True, default=None)

    @property
    def jaxpr(self) -> jax.extend.core.Jaxpr:
        return self.traced.jaxpr

    def __call__(self, *args: Array) -> Array:
        # A constant mod's output is a literal of the jaxpr: an array, to be broadcast.
        out = eval_jaxpr(self.jaxpr, self.consts, *args, rule=_read_tables)[0]
        return jnp.asarray(out, self.jaxpr.outvars[0].aval.dtype)


class Table:
    """An array a kernel reads by lookups rather than as a whole: a spec leaf inside a Pallas
    kernel (see `_kernels/_in_kernel.py`).

    A mod that indexes a captured array with positions (`ids[q_pos]`, `slopes[head]`, a
    relative-position table) does so with one-element `dynamic_slice`s, which a Triton kernel
    cannot lower on a loaded array; on a table they become `lookup`s. `read(*idx)` reads the
    elements at the (in-range) integer index arrays `idx`; `load()` reads the whole array,
    for any other use.
    """

    def __init__(self, shape: tuple[int, ...], dtype, read: Callable, load: Callable):
        self.shape, self.dtype, self.read, self.load = shape, dtype, read, load

    def lookup(self, *idx: Array) -> Array:
        return self.read(*idx)

    def __getitem__(self, i: int) -> Array:
        return self.read(jnp.int32(i))


def _read_tables(eqn, inputs) -> list | None:
    """`eval_jaxpr`'s rule for equations that read a [`Table`][]: an element lookup (what
    indexing with scalar positions traces to) reads the table there, anything else loads it.
    `None` for equations that touch no table."""
    if not any(isinstance(x, Table) for x in inputs):
        return None
    name = eqn.primitive.name
    if name == "jit":
        inner = eqn.params["jaxpr"]
        return eval_jaxpr(inner.jaxpr, inner.consts, *inputs, rule=_read_tables)
    table = inputs[0]
    if (
        name == "dynamic_slice"
        and isinstance(table, Table)
        and set(eqn.params["slice_sizes"]) == {1}
    ):
        # `dynamic_slice` clamps its start indices into the array.
        idx = [jnp.clip(i, 0, n - 1) for i, n in zip(inputs[1:], table.shape, strict=True)]
        return [jnp.reshape(table.lookup(*idx), (1,) * len(idx))]
    inputs = [x.load() if isinstance(x, Table) else x for x in inputs]
    outputs = eqn.primitive.bind(*inputs, **eqn.params)
    return outputs if eqn.primitive.multiple_results else [outputs]


def as_data(mod: Callable | None, name: str, axes: tuple, *example_args: Array) -> DataMod | None:
    """`mod` as a [`DataMod`][]: traced once on scalars like `example_args`.

    A closure over arrays (ALiBi slopes, a relative-position table, per-example document
    ids under `vmap`) would otherwise hide those arrays from `grad` and from the kernels'
    custom VJP. Tracing on scalars also checks that the mod is elementwise and returns one
    value of the right kind: a bool for `mask_mod`, a float score for `score_mod`.

    Inside `shard_map`, the captured arrays are cast here, once, to vary over the inputs' mesh
    `axes`: cast inside a kernel's backward pass instead, their gradient would be summed over
    the devices (the cast's transpose) at every block.
    """
    if mod is None:
        return None
    try:
        closed = jax.make_jaxpr(mod)(*example_args)
    except Exception as error:
        raise ValueError(
            f"{name} must be an elementwise function of scalars {example_args}; calling it "
            f"on them failed: {error}"
        ) from error
    out = closed.out_avals
    if len(out) != 1 or out[0].shape != ():
        raise ValueError(
            f"{name} must be elementwise, returning one value for scalar arguments, got "
            f"{', '.join(map(str, out))}"
        )
    want, kind = (jnp.bool_, "a bool") if name == "mask_mod" else (jnp.floating, "a float")
    if not jnp.issubdtype(out[0].dtype, want):
        raise ValueError(f"{name} must return {kind}, got dtype {out[0].dtype.name}")
    # Constants the mod builds itself (NumPy arrays, `jnp.asarray` of NumPy) come out of
    # tracing as NumPy arrays: leaves like the captured ones, as JAX arrays.
    consts = tuple(c if isinstance(c, jax.Array) else jnp.asarray(c) for c in closed.consts)
    num_positions = getattr(mod, "num_positions", None)
    return DataMod(TracedMod(closed.jaxpr), tuple(vary(consts, axes)), num_positions)


def known(pred) -> bool | None:
    """Whether any element of `pred` (of any example, under `vmap`) is True, when that is
    known now: `None` when it depends on traced values (inside `jit`)."""
    with jax.ensure_compile_time_eval():
        pred = unvmap_any(jnp.asarray(pred))
        try:
            return bool(pred)
        except jax.errors.ConcretizationTypeError:
            return None


def check(x, pred, message: Callable[[], str], traced_message: str):
    """`x`, once `pred` is known to be all False.

    Known now, a True `pred` raises `ValueError(message())`; traced, `x` comes back with an
    `eqx.error_if` threaded onto it that raises `traced_message` at run time (as an
    `equinox.EquinoxRuntimeError`), wherever `x` is used.
    """
    state = known(pred)
    if state:
        raise ValueError(message())
    if state is None and any(eqx.is_array(leaf) for leaf in jax.tree.leaves(x)):
        return eqx.error_if(x, pred, traced_message)
    return x


def check_mod_positions(spec: "AttentionSpec", axes: tuple = ()) -> "AttentionSpec":
    """`spec`, once every mod that is defined on positions `0..n - 1` only (a ready-made mod
    holding arrays, with `num_positions = n`) is known to see no position past them.

    The positions seen are those of the real query rows (all rows, or the first
    `query_seq_length`) and of the keys that may be visible (all slots, or the first
    `key_value_seq_length`), by the position model. Known positions (static shapes, concrete
    offsets, lengths and key positions) raise a `ValueError` naming both lengths here; traced
    ones (under `jit`) raise when the call runs, through `eqx.error_if`, except inside
    `shard_map` (`axes`), where they are not checked. Negative positions (empty key slots,
    queries before the first key) are not checked: a mod sees them masked or not at all.
    """
    for name in ("mask_mod", "score_mod"):
        mod = getattr(spec, name)
        if mod is None or mod.num_positions is None:
            continue
        n = mod.num_positions
        # Evaluated now where nothing is traced, also inside `jit`.
        with jax.ensure_compile_time_eval():
            rows, slots = spec.q_seq, spec.kv_seq
            if spec.q_length is not None:
                rows = jnp.clip(spec.q_length, 0, spec.q_seq)
            if spec.kv_length is not None:
                slots = jnp.clip(spec.kv_length, 0, spec.kv_seq)
            last_q = jnp.where(rows > 0, spec.offset + rows - 1, -1)
            if spec.key_positions is None:
                last_k = jnp.asarray(slots - 1)
            else:
                filled = jnp.arange(spec.kv_seq) < slots
                last_k = jnp.max(jnp.where(filled, spec.key_positions, -1), initial=-1)
            need = jnp.maximum(last_q, last_k) + 1
            # Compared here too: inside `jit`, a comparison outside would be traced.
            too_far = need > n

        def message(name=name, n=n, last_q=last_q, last_k=last_k, need=need):
            with jax.ensure_compile_time_eval():
                lq, lk, m = (int(unvmap_max(x)) for x in (last_q, last_k, need))
            return (
                f"{name} is defined on {n} positions (the length of its arrays), but this "
                f"call needs {m}: its queries sit at positions up to {lq} and its keys up to "
                f"{lk}; give the mod arrays that cover every position (with a cache, its "
                "max_length)"
            )

        traced = (
            f"{name} is defined on {n} positions (the length of its arrays), but this call's "
            "query or key positions run past them (checked at run time, as they are traced)"
        )
        if axes and known(too_far) is None:
            continue
        spec = check(spec, too_far, message, traced)
    return spec


def elementwise(fn: Callable, *args: Array) -> Array:
    """`fn` of scalars, applied over broadcastable arrays: one `vmap` per axis that varies."""
    ndim = max(a.ndim for a in args)
    args = tuple(jnp.reshape(a, (1,) * (ndim - a.ndim) + a.shape) for a in args)
    if ndim == 0:
        return fn(*args)
    varying = [a.shape[0] != 1 for a in args]
    inner = tuple(a if v else a[0] for a, v in zip(args, varying, strict=True))
    if not any(varying):
        return elementwise(fn, *inner)[None]
    in_axes = tuple(0 if v else None for v in varying)
    return jax.vmap(lambda *xs: elementwise(fn, *xs), in_axes=in_axes)(*inner)


def query_positions(q_seq: int, kv_seq: int, query_offset=None) -> Int[Array, " q_seq"]:
    """The positions of `q_seq` queries: `query_offset + i`, or bottom-right aligned with the
    `kv_seq` keys at `0..kv_seq - 1` (the last query sits at the last key's position)."""
    offset = kv_seq - q_seq if query_offset is None else query_offset
    return offset + jnp.arange(q_seq, dtype=jnp.int32)


class AttentionSpec(eqx.Module):
    """Everything but q/k/v that decides the attention probabilities of one example.

    The position model, the one place positions are defined: query row `i` sits at position
    `offset + i` (bottom-right aligned by default, or `query_offset`), key `j` at position
    `j` (or `key_positions[j]`, where a negative position marks an empty slot). Causality,
    windows and the mods work on these positions; the lengths and dense masks on indices.
    A KV cache is then just an offset and a filled length (`kv_length`).

    Dense `bias`/`mask` arrays are stored with the heads split as `[num_kv_heads|1,
    group|1, q_seq|1, kv_seq|1]`, matching the kernels' `[K, G, T, D]` query layout.
    """

    q_seq: int = eqx.field(static=True)
    kv_seq: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    is_causal: bool = eqx.field(static=True)
    window: Window | None = eqx.field(static=True)
    logit_softcap: float | None = eqx.field(static=True)
    # `None` when there is no dropout; an array otherwise, so that a new rate (changed with
    # `eqx.tree_at`, or traced) does not recompile.
    dropout_p: Float[Array, ""] | None
    # Their captured arrays are leaves of the spec (see `as_data`).
    mask_mod: DataMod | None
    score_mod: DataMod | None
    mask: Bool[Array, "_ _ _ _"] | None
    q_length: Int[Array, ""] | None
    kv_length: Int[Array, ""] | None
    q_segment_ids: Int[Array, " q_seq"] | None
    kv_segment_ids: Int[Array, " kv_seq"] | None
    dropout_seed: UInt32[Array, "2"] | None
    # Learned sink logits, one per query head as `[K, G]`: a zero-valued key every query sees.
    sinks: Float[Array, "_ G"] | None = None
    # The position model's data, when the positions are not the default ones.
    query_offset: Int[Array, ""] | None = None
    key_positions: Int[Array, " kv_seq"] | None = None
    # Set when a kernel works on one key/value head at a time: which one it is.
    kv_head: Int[Array, ""] | None = None

    @property
    def offset(self) -> int | Int[Array, ""]:
        """The position of query row 0: `query_offset`, or bottom-right alignment."""
        return self.kv_seq - self.q_seq if self.query_offset is None else self.query_offset

    def q_positions(self, q_idx: Int[Array, "*idx"]) -> Int[Array, "*idx"]:
        return q_idx + self.offset

    def kv_positions(self, kv_idx: Int[Array, "*idx"]) -> Int[Array, "*idx"]:
        return kv_idx if self.key_positions is None else _take(self.key_positions, kv_idx)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_index(self) -> Int[Array, "_ G 1 1"]:
        """Query-head index of each `[K, G]` slot (of the one `kv_head`, when set)."""
        heads = jnp.arange(self.num_heads, dtype=jnp.int32).reshape(self.num_kv_heads, self.group)
        if self.kv_head is not None:
            heads = jax.lax.dynamic_slice_in_dim(heads, self.kv_head, 1, axis=0)
        return heads[:, :, None, None]

    def scores(
        self,
        logits: Float[Array, "K G bq bk"],
        q_idx: Int[Array, " bq"],
        kv_idx: Int[Array, " bk"],
        bias: Float[Array, "_ _ _ _"] | None,
        heads: Int[Array, "_ _ #bq 1"] | None = None,
    ) -> Float[Array, "K G bq bk"]:
        """Scaled, score-modded, soft-capped and biased logits, in that order.

        The bias comes after the cap, as Gemma 2 masks after capping: a bias of `-inf` (or
        `-1e9`) used as an additive mask keeps hiding its key instead of becoming `-cap`.
        `heads` is the query head of each row, for kernels whose rows hold several heads
        (by default, [`head_index`][] of the `[K, G]` axes).
        """
        s = logits * self.scale
        if self.score_mod is not None:
            q_pos, kv_pos = self._real_positions(q_idx, kv_idx)
            heads = self.head_index if heads is None else heads
            s = elementwise(self.score_mod, s, heads, q_pos, kv_pos)
        if self.logit_softcap is not None:
            s = self.logit_softcap * jnp.tanh(s / self.logit_softcap)
        if bias is not None:
            s = s + bias
        return s

    def visible(
        self,
        q_idx: Int[Array, " bq"],
        kv_idx: Int[Array, " bk"],
        mask: Bool[Array, "_ _ _ _"] | None,
    ) -> Bool[Array, "_ _ #bq #bk"] | None:
        """Which (query, key) pairs may attend, broadcastable to `[K, G, bq, bk]`.

        `None` means every pair may: kernels then skip the masking work entirely.
        """
        q_pos = self.q_positions(q_idx)[:, None]
        kv_pos = self.kv_positions(kv_idx)[None, :]
        conds = []
        if self.key_positions is not None:
            conds.append(kv_pos >= 0)
        if self.is_causal:
            conds.append(kv_pos <= q_pos)
        if self.window is not None:
            left, right = self.window
            conds += [kv_pos >= q_pos - left, kv_pos <= q_pos + right]
        if self.q_length is not None:
            conds.append(q_idx[:, None] < self.q_length)
        if self.kv_length is not None:
            conds.append(kv_idx[None, :] < self.kv_length)
        if self.q_segment_ids is not None and self.kv_segment_ids is not None:
            q_seg = _take(self.q_segment_ids, q_idx)
            kv_seg = _take(self.kv_segment_ids, kv_idx)
            conds.append(q_seg[:, None] == kv_seg[None, :])
        if self.mask_mod is not None:
            conds.append(elementwise(self.mask_mod, *self._real_positions(q_idx, kv_idx)))
        if mask is not None:
            conds.append(mask)
        if not conds:
            return None
        ok = conds[0]
        for cond in conds[1:]:
            ok = ok & cond
        return jnp.broadcast_to(ok, ok.shape[:-2] + (q_idx.shape[0], kv_idx.shape[0]))[
            (None,) * (4 - ok.ndim)
        ]

    def _real_positions(self, q_idx, kv_idx) -> tuple[Int[Array, "bq 1"], Int[Array, "1 bk"]]:
        """Positions for the mods, with the kernels' block padding clamped to real ones.

        A mod may be undefined past the sequence (e.g. `sqrt(kv_seq - 1 - kv_pos)`); those
        pairs are masked anyway, but a NaN there would still reach the gradient through
        `where`.
        """
        q_pos = self.q_positions(jnp.minimum(q_idx, self.q_seq - 1))
        return q_pos[:, None], self.kv_positions(jnp.minimum(kv_idx, self.kv_seq - 1))[None, :]

    def keep(
        self,
        q_idx: Int[Array, " bq"],
        kv_idx: Int[Array, " bk"],
        heads: Int[Array, "_ _ #bq 1"] | None = None,
    ) -> Bool[Array, "_ _ bq bk"]:
        """Dropout keep-mask: a counter-based hash of (seed, head, query, key).

        Being a pure function of absolute indices, the mask is identical in every
        implementation and for every block size, and the backward pass regenerates it
        instead of storing it. `heads` is as in [`scores`][].
        """
        assert self.dropout_seed is not None and self.dropout_p is not None
        seed0, seed1 = self.dropout_seed[0], self.dropout_seed[1]
        h = _mix32(q_idx.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + seed0)[:, None]
        h = _mix32(h ^ (kv_idx.astype(jnp.uint32)[None, :] * jnp.uint32(0x85EBCA6B) + seed1))
        heads = self.head_index if heads is None else heads
        h = _mix32(h[None, None] ^ (heads.astype(jnp.uint32) * jnp.uint32(0xC2B2AE35)))
        # A float32 rate below one times 2**32 is at most 2**32 - 256: it fits in uint32.
        threshold = (self.dropout_p * 2.0**32).astype(jnp.uint32)
        return h >= threshold

    @property
    def only_structural(self) -> bool:
        """True when causal/window structure on the default positions alone decides
        visibility (no data-dependent mask or position)."""
        data = (self.mask, self.q_length, self.kv_length, self.q_segment_ids, self.mask_mod)
        data += (self.query_offset, self.key_positions)
        return all(x is None for x in data)

    def reach(self) -> tuple[int | None, int | None]:
        """A query at position p sees keys in [p - left, p + right]; None = unlimited."""
        left = right = None
        if self.is_causal:
            right = 0
        if self.window is not None:
            left = self.window[0]
            right = self.window[1] if right is None else min(right, self.window[1])
        return left, right

    def kv_ranges(self, q_start, block_q: int):
        """Key ranges `(lo, hi, inner_lo, inner_hi)` for queries `[q_start, q_start + block_q)`.

        `[lo, hi)` holds every key some query of the block may see; every query sees every
        key of `[inner_lo, inner_hi)` as far as causal/window structure goes. Kernels skip
        keys outside the first range and evaluate no mask inside the second. The bounds depend
        only on loop indices, so they stay un-batched under `jax.vmap`.
        """
        left, right = self.reach()
        first = q_start + self.offset
        last = first + block_q - 1
        lo = 0 if left is None else jnp.clip(first - left, 0, self.kv_seq)
        hi = self.kv_seq if right is None else jnp.clip(last + right + 1, 0, self.kv_seq)
        inner_lo = lo if left is None else jnp.clip(last - left, 0, self.kv_seq)
        inner_hi = hi if right is None else jnp.clip(first + right + 1, 0, self.kv_seq)
        return lo, jnp.maximum(lo, hi), inner_lo, jnp.maximum(inner_lo, inner_hi)

    def q_ranges(self, kv_start, block_k: int):
        """Query-row ranges `(lo, hi, inner_lo, inner_hi)` for keys from `kv_start` on.

        The transpose of [`kv_ranges`][]: rows that may see some key of the block, and rows that
        see all of them. A key c is seen by positions p with c - right <= p <= c + left.
        """
        left, right = self.reach()
        first, last = kv_start, kv_start + block_k - 1
        lo = 0 if right is None else jnp.clip(first - right - self.offset, 0, self.q_seq)
        hi = self.q_seq if left is None else jnp.clip(last + left + 1 - self.offset, 0, self.q_seq)
        inner_lo = lo if right is None else jnp.clip(last - right - self.offset, 0, self.q_seq)
        inner_hi = hi if left is None else jnp.clip(first + left + 1 - self.offset, 0, self.q_seq)
        return lo, jnp.maximum(lo, hi), inner_lo, jnp.maximum(inner_lo, inner_hi)


def replace(spec: AttentionSpec, **changes) -> AttentionSpec:
    """`spec` with some fields changed (`dataclasses.replace`, which `eqx.tree_at` is not:
    it cannot replace a `None` leaf).

    Leaves that JAX turned into NumPy literals (a constant length saved by a custom VJP for
    its backward pass, under `jit`) become arrays again, as the fields' types want.
    """
    fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    fields = {**fields, **changes}
    fields = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, fields)
    return type(spec)(**fields)


def _take(ids: "Int[Array, ' n'] | Table", idx: Int[Array, "*b"]) -> Int[Array, "*b"]:
    # Padded block positions may run past the end; they are masked elsewhere.
    if isinstance(ids, Table):
        return ids.lookup(jnp.clip(idx, 0, ids.shape[0] - 1))
    return jnp.take(ids, idx, mode="clip")


def _mix32(x: UInt32[Array, "..."]) -> UInt32[Array, "..."]:
    # A 32-bit integer finaliser (xorshift-multiply); good avalanche at 5 cheap ops.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dense_block(arr: Array | None, q_start, block_q: int, kv_start, block_k: int) -> Array | None:
    """Slice a stored `[K|1, G|1, T|1, S|1]` mask or bias to one block (size-1 axes stay)."""
    if arr is None:
        return None
    if arr.shape[2] != 1:
        arr = jax.lax.dynamic_slice_in_dim(arr, q_start, block_q, axis=2)
    if arr.shape[3] != 1:
        arr = jax.lax.dynamic_slice_in_dim(arr, kv_start, block_k, axis=3)
    return arr

"""The spec inside a Pallas kernel: its leaves as kernel operands, read back as a spec.

A Pallas kernel closes over no array: everything it reads is an operand. So a kernel takes the
spec's leaves (lengths, offsets, segment ids, key positions, the dropout seed and rate, the
mods' captured arrays) as whole-array operands and rebuilds the spec from their refs. Scalars
are read once, as values; every other leaf becomes a [`Table`][eqx_attention._spec.Table]
read by lookups, so the spec's own code (`visible`, `scores`, `keep`, the mods) runs
unchanged inside the kernel: one description of masking for every implementation. A lookup
into a ref is a gather from memory, which Triton lowers (a `jnp.take` of a loaded array it
does not).

The gradient of `score_mod`'s floating-point arrays needs them as values instead (JAX
differentiates values, not refs): [`one_hot_table`][] reads a loaded array by comparison, a
form whose transpose is a sum, with no scatter, so the kernel accumulates its per-block
gradient deterministically.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .._spec import AttentionSpec, Table


def whole(x) -> pl.BlockSpec:
    """A `BlockSpec` that hands every program the whole array."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def ref_table(ref) -> Table:
    """A table read from a kernel ref: each lookup a gather from memory."""
    return Table(ref.shape, ref.dtype, lambda *idx: ref[idx], lambda: ref[...])


def one_hot_table(value) -> Table:
    """A table read from a loaded array by comparing each index with every position: linear
    in the table's size per lookup, but differentiable into a sum, with no scatter."""

    def read(*idx):
        flat, position = jnp.reshape(value, (-1,)), idx[0]
        for i, n in zip(idx[1:], value.shape[1:], strict=True):
            position = position * n + i
        hit = position[..., None] == jnp.arange(flat.shape[0], dtype=position.dtype)
        return jnp.sum(jnp.where(hit, flat, jnp.zeros((), flat.dtype)), axis=-1)

    return Table(value.shape, value.dtype, read, lambda: value)


def _is_mod_param(path) -> bool:
    """Whether a spec leaf's path is one of `score_mod`'s captured arrays."""
    return getattr(path[0], "name", None) == "score_mod"


def spec_operands(spec: AttentionSpec) -> tuple[list, Callable, list[int]]:
    """`(operands, rebuild, params)`: the spec's leaves as kernel operands (scalars as `(1,)`
    arrays), `rebuild(refs, values=None)` to make the spec again inside the kernel, and the
    positions among the operands of `score_mod`'s floating-point arrays.

    `values` maps some of those positions to loaded values, read as [`one_hot_table`][]s
    (to differentiate the scores with respect to them).
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(spec)
    leaves = [leaf for _, leaf in with_paths]
    scalar = [jnp.ndim(leaf) == 0 for leaf in leaves]
    operands = [jnp.reshape(x, (1,)) if s else x for x, s in zip(leaves, scalar, strict=True)]
    params = [
        i
        for i, (path, leaf) in enumerate(with_paths)
        if _is_mod_param(path) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]

    def rebuild(refs, values=None) -> AttentionSpec:
        values = values or {}
        read = []
        for i, (ref, s) in enumerate(zip(refs, scalar, strict=True)):
            if i in values:
                read.append(one_hot_table(values[i]))
            else:
                read.append(ref[0] if s else ref_table(ref))
        return jax.tree.unflatten(treedef, read)

    return operands, rebuild, params

"""Converters from Equinox's and Flax's multi-head attention to `MultiheadAttention`.

They build through the class they are given (`cls`), so this module needs nothing from
`_mha.py` and the import graph stays one-way.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp


def from_equinox(cls, module: eqx.nn.MultiheadAttention):
    """`cls` with the projections and dropout of an `equinox.nn.MultiheadAttention`."""
    new = cls(
        module.num_heads,
        module.query_size,
        module.key_size,
        module.value_size,
        module.output_size,
        module.qk_size,
        module.vo_size,
        module.use_query_bias,
        module.use_key_bias,
        module.use_value_bias,
        module.use_output_bias,
        dtype=module.query_proj.weight.dtype,
        key=jax.random.key(0),
    )
    return eqx.tree_at(
        lambda m: (m.query_proj, m.key_proj, m.value_proj, m.output_proj, m.dropout),
        new,
        (module.query_proj, module.key_proj, module.value_proj, module.output_proj, module.dropout),
    )


def from_flax_nnx(cls, module: Any):
    """`cls` with the parameters of a `flax.nnx.MultiHeadAttention`, or a `ValueError`
    naming what it cannot reproduce. Flax's `param_dtype` is the parameters' dtype and its
    computation `dtype` (if any) becomes `compute_dtype`."""
    param_dtype = jnp.dtype(module.query.kernel[...].dtype)
    compute_dtype = None if module.dtype is None else jnp.dtype(module.dtype)
    if module.broadcast_dropout and module.dropout_rate > 0:
        raise ValueError(
            "cannot convert a flax.nnx.MultiHeadAttention with broadcast_dropout=True and "
            f"dropout_rate={module.dropout_rate}: it shares one dropout mask across the batch "
            "and the heads, which a per-example module cannot reproduce. Set "
            "broadcast_dropout=False (or dropout_rate=0) on the Flax module first."
        )
    in_kv = module.in_kv_features
    heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    use_bias = bool(module.use_bias)
    new = cls(
        heads,
        module.in_features,
        in_kv,
        in_kv,
        module.out_features,
        head_dim,
        head_dim,
        use_bias,
        use_bias,
        use_bias,
        use_bias,
        float(module.dropout_rate),
        bool(module.deterministic),
        param_dtype,
        num_kv_heads=kv_heads,
        normalize_qk=bool(module.normalize_qk),
        compute_dtype=compute_dtype,
        key=jax.random.key(0),
    )

    def convert(linear: eqx.nn.Linear, layer: Any, flat_in: int, flat_out: int):
        # (in, heads, head_dim) or (heads, head_dim, out) kernels: flatten the head axes
        # (head-major, as here) and transpose to Equinox's (out, in).
        weight = jnp.asarray(layer.kernel[...]).reshape(flat_in, flat_out).T
        if not use_bias:
            return eqx.tree_at(lambda lin: lin.weight, linear, weight)
        bias = jnp.asarray(layer.bias[...]).reshape(flat_out)
        return eqx.tree_at(lambda lin: (lin.weight, lin.bias), linear, (weight, bias))

    new = eqx.tree_at(
        lambda m: (m.query_proj, m.key_proj, m.value_proj, m.output_proj),
        new,
        (
            convert(new.query_proj, module.query, module.in_features, heads * head_dim),
            convert(new.key_proj, module.key, in_kv, kv_heads * head_dim),
            convert(new.value_proj, module.value, in_kv, kv_heads * head_dim),
            convert(new.output_proj, module.out, heads * head_dim, module.out_features),
        ),
    )
    if new.query_norm is not None and new.key_norm is not None:
        new = eqx.tree_at(
            lambda m: (m.query_norm.weight, m.key_norm.weight),
            new,
            (jnp.asarray(module.query_ln.scale[...]), jnp.asarray(module.key_ln.scale[...])),
        )
    return new

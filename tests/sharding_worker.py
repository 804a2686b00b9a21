"""Multi-device checks for tests/test_sharding.py, run in a subprocess with 8 CPU devices.

The device count is fixed when JAX starts, and the rest of the suite runs on one device, so
`test_sharding.py` runs this script once with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and asserts on the JSON it prints:
for every check, the largest absolute difference from the single-device computation (and a
few facts about shardings and collectives).
"""

import json
import re
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eqx_attention

jax.config.update("jax_default_matmul_precision", "highest")

RING = 4  # devices on the sequence axis
SEQ = 40  # local slices of 10: tiles of 4 need padding, zig-zag runs of 5 too


def max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def ring_check(
    name,
    *,
    q_seq=SEQ,
    layout="contiguous",
    batch=None,
    check_vma=True,
    segments=False,
    sinks=False,
    alibi=False,
    block_sizes=None,
    **kwargs,
):
    """Ring attention vs single-device attention: output and (q, k, v) gradients, and those
    of learned sinks and of the ALiBi slopes a `score_mod` closes over."""
    keys = jax.random.split(jax.random.key(hash(name) % 2**31), 7)
    lead = () if batch is None else (batch,)
    q = jax.random.normal(keys[0], lead + (q_seq, 4, 8))
    k = jax.random.normal(keys[1], lead + (SEQ, 2, 8))
    v = jax.random.normal(keys[2], lead + (SEQ, 2, 6))
    cotangent = jax.random.normal(keys[3], lead + (q_seq, 4, 6))
    # Learned sinks and slopes are replicated on every device, and differentiated too.
    learned = dict(
        sinks=jax.random.normal(keys[5], (4,)) if sinks else None,
        slopes=jax.random.uniform(keys[6], (4,), minval=0.1) if alibi else None,
    )
    args = (q, k, v, learned)
    # Three packed documents of uneven length, crossing shard boundaries.
    kv_seg = jnp.repeat(jnp.arange(3), jnp.array([13, 17, 10]), total_repeat_length=SEQ)
    q_seg = kv_seg[SEQ - q_seq :]

    def options(qs, ks, learned):
        extra = dict(query_segment_ids=qs, kv_segment_ids=ks) if segments else {}
        if learned["slopes"] is not None:
            slopes = learned["slopes"]
            extra["score_mod"] = lambda s, h, qp, kp: s - slopes[h] * jnp.abs(qp - kp)
        return {**kwargs, **extra, "sinks": learned["sinks"]}

    def reference(q, k, v, learned):
        fn = lambda q, k, v: eqx_attention.dot_product_attention(  # noqa: E731
            q, k, v, implementation="xla", **options(q_seg, kv_seg, learned)
        )
        return fn(q, k, v) if batch is None else jax.vmap(fn)(q, k, v)

    mesh = Mesh(np.array(jax.devices()[:RING]), ("seq",))
    seq_spec = P("seq") if batch is None else P(None, "seq")

    def local(q, k, v, qs, ks, learned):
        fn = lambda q, k, v: eqx_attention.ring_attention(  # noqa: E731
            q, k, v, axis_name="seq", layout=layout, block_sizes=block_sizes,
            **options(qs, ks, learned),
        )  # fmt: skip
        return fn(q, k, v) if batch is None else jax.vmap(fn)(q, k, v)

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(seq_spec, seq_spec, seq_spec, P("seq"), P("seq"), P()),
        out_specs=seq_spec,
        check_vma=check_vma,
    )

    def ring(q, k, v, learned):
        if layout != "zigzag":
            return sharded(q, k, v, q_seg, kv_seg, learned)
        # Reorder whole sequences before sharding, and restore the output's order after.
        axis = 0 if batch is None else 1
        to = lambda x, axis=axis: eqx_attention.to_zigzag(x, RING, axis=axis)  # noqa: E731
        out = sharded(to(q), to(k), to(v), to(q_seg, 0), to(kv_seg, 0), learned)
        return eqx_attention.from_zigzag(out, RING, axis=axis)

    def value_and_grads(fn):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    got = jax.jit(lambda: value_and_grads(ring))()
    want = jax.jit(lambda: value_and_grads(reference))()
    return max_diff(got, want)


class Model(eqx.Module):
    attn: eqx_attention.MultiheadAttention
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attn = eqx_attention.MultiheadAttention(4, 16, num_kv_heads=2, key=k1)
        self.head = eqx.nn.Linear(16, 16, key=k2)

    def __call__(self, x):
        return jax.vmap(self.head)(jax.nn.gelu(self.attn(x, is_causal=True)))


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


OPTIM = optax.adam(1e-2)


@eqx.filter_jit
def train_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = OPTIM.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


def training_check(mesh_shape, head_axis):
    """Two optimiser steps with the batch sharded (and heads, if `head_axis`) vs one device."""
    model = Model(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 12, 16))
    y = jax.random.normal(jax.random.key(2), (8, 12, 16))

    def two_steps(model, x, y):
        opt_state = OPTIM.init(eqx.filter(model, eqx.is_array))
        for _ in range(2):
            model, opt_state, loss = train_step(model, opt_state, x, y)
        return model, loss

    want = two_steps(model, x, y)

    names = ("data",) if head_axis is None else ("data", head_axis)
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), names)
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    if head_axis is None:
        model = eqx.filter_shard(model, NamedSharding(mesh, P()))
    else:
        model = eqx_attention.shard_heads(model, mesh, head_axis)
    got = two_steps(model, x, y)
    result = {"diff": max_diff(eqx.filter(got, eqx.is_array), eqx.filter(want, eqx.is_array))}
    if head_axis is not None:
        weights = got[0].attn
        result["query_spec"] = str(weights.query_proj.weight.sharding.spec)
        result["output_spec"] = str(weights.output_proj.weight.sharding.spec)
        dynamic, static = eqx.partition(model, eqx.is_array)
        loss = lambda d, x, y: loss_fn(eqx.combine(d, static), x, y)  # noqa: E731
        hlo = jax.jit(loss).lower(dynamic, x, y).compile().as_text()
        result["forward_all_gathers"] = len(re.findall(r"all-gather(?:-start)?\(", hlo))
        try:
            eqx_attention.shard_heads(
                Model(jax.random.key(0)), Mesh(np.array(jax.devices()), ("m",)), "m"
            )
        except ValueError as e:
            result["indivisible_error"] = str(e)
    return result


def zigzag_explicit_check():
    """`to_zigzag`/`from_zigzag` on an array sharded over a mesh with `Explicit` axes: the
    same reordering as on the host, and the sharding stays."""
    mesh = jax.make_mesh((RING,), ("seq",), axis_types=(jax.sharding.AxisType.Explicit,))
    host = np.arange(2 * SEQ * 3, dtype=np.float32).reshape(2, SEQ, 3)
    x = jax.device_put(host, NamedSharding(mesh, P(None, "seq")))
    zigzag = eqx_attention.to_zigzag(x, RING, axis=1)
    expected = np.take(host, eqx_attention.zigzag_indices(SEQ, RING), axis=1)
    back = eqx_attention.from_zigzag(zigzag, RING, axis=1)
    return {
        "diff": max(float(np.max(np.abs(np.asarray(zigzag) - expected))), max_diff(back, x)),
        "specs": [str(zigzag.sharding.spec), str(back.sharding.spec)],
    }


def shard_map_check():
    """The blockwise kernel inside `shard_map` with `check_vma=True`, the batch split over 8
    devices: output, `grad`, `jvp` and an HVP equal one device's."""
    q = jax.random.normal(jax.random.key(3), (8, 40, 4, 8))
    kv = jax.random.normal(jax.random.key(4), (8, 40, 2, 8))

    def one(q, kv):
        return eqx_attention.dot_product_attention(
            q, kv, kv, is_causal=True, implementation="chunked"
        )

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.shard_map(jax.vmap(one), mesh=mesh, in_specs=P("data"), out_specs=P("data"))

    def derivatives(attend):
        fn = lambda q: attend(q, kv)  # noqa: E731
        loss = lambda q: jnp.sum(jnp.sin(fn(q)))  # noqa: E731
        return (
            fn(q),
            jax.grad(loss)(q),
            jax.jvp(fn, (q,), (q,))[1],
            jax.jvp(jax.grad(loss), (q,), (q,))[1],
        )

    return max_diff(jax.jit(lambda: derivatives(sharded))(), derivatives(jax.vmap(one)))


def main():
    results = {
        "ring_gqa_batched_tiles": ring_check("gqa", batch=2, block_sizes=(4, 4), scale=0.3),
        "ring_causal_sinks_alibi": ring_check("causal", is_causal=True, sinks=True, alibi=True),
        "ring_causal_zigzag_segments": ring_check(
            "zigzag", layout="zigzag", is_causal=True, segments=True, block_sizes=(2, 2)
        ),
        "ring_window_segments_dropout": ring_check(
            "window",
            local_window_size=(6, 1),
            segments=True,
            logit_softcap=4.0,
            key_value_seq_length=37,
            dropout_p=0.25,
            dropout_key=jax.random.key(7),
            block_sizes=(4, 3),
        ),  # fmt: skip
        "ring_cross_causal_unchecked": ring_check(
            "cross", q_seq=SEQ // 2, is_causal=True, check_vma=False
        ),
        "ring_cross_sinks_alibi_unchecked": ring_check(
            "cross", q_seq=SEQ // 2, is_causal=True, sinks=True, alibi=True, check_vma=False
        ),
        "zigzag_explicit": zigzag_explicit_check(),
        "data_parallel": training_check((8,), None),
        "shard_map_derivatives": shard_map_check(),
        "data_and_head_parallel": training_check((4, 2), "model"),
    }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

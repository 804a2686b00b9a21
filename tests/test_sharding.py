"""Ring attention, the zig-zag layout and sharded training.

Multi-device checks run in one subprocess with 8 simulated CPU devices
(tests/sharding_worker.py, which also holds the data- and head-parallel training recipes);
the rest runs here on the suite's single device.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import eqx_attention
from eqx_attention import _sharding

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")
# float32 with "highest" matmul precision: ring and single-device results differ only by the
# order of the online-softmax accumulation.
TOL = 2e-5


def test_multi_device():
    # One subprocess and one test (not a fixture shared by several), so that pytest-xdist
    # workers cannot each start their own 8-device run.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    # Output and q/k/v (and sinks) gradients over a 4-device ring vs dot_product_attention.
    ring = {name: diff for name, diff in results.items() if name.startswith("ring_")}
    assert len(ring) == 6
    assert all(diff < TOL for diff in ring.values()), ring
    # Zig-zag reordering of an array already sharded over an Explicit-axes mesh.
    zigzag = results["zigzag_explicit"]
    assert zigzag["diff"] == 0, zigzag
    assert zigzag["specs"] == [str(P(None, "seq", None))] * 2, zigzag
    # Two optimiser steps with the batch sharded over 8 devices, then over 4 with the heads
    # split over the other 2, equal two steps on one device.
    assert results["data_parallel"]["diff"] < 1e-5, results["data_parallel"]
    # The blockwise kernel inside `shard_map` (check_vma=True): forward, grad, jvp and HVP.
    assert results["shard_map_derivatives"] < 1e-4, results["shard_map_derivatives"]
    heads = results["data_and_head_parallel"]
    assert heads["diff"] < 1e-5, heads
    # The heads stay split through the optimiser step, and the forward pass never gathers
    # them: each device computes its own heads' attention.
    assert heads["query_spec"] == str(P("model"))
    assert heads["output_spec"] == str(P(None, "model"))
    assert heads["forward_all_gathers"] == 0
    assert "num_kv_heads=2" in heads["indivisible_error"]


def _one_device_ring(batched=False, **kwargs):
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    attend = lambda q, k, v: eqx_attention.ring_attention(q, k, v, axis_name="seq", **kwargs)  # noqa: E731
    spec = P(None, "seq") if batched else P("seq")
    attend = jax.vmap(attend) if batched else attend
    return jax.shard_map(attend, mesh=mesh, in_specs=spec, out_specs=spec)


def test_ring_on_one_device(getkey):
    q = jax.random.normal(getkey(), (10, 4, 8))
    k = jax.random.normal(getkey(), (10, 2, 8))
    v = jax.random.normal(getkey(), (10, 2, 8))
    ring = _one_device_ring(is_causal=True, local_window_size=3, block_sizes=(3, 4))
    want = eqx_attention.dot_product_attention(q, k, v, is_causal=True, local_window_size=3)
    assert jnp.allclose(ring(q, k, v), want, atol=TOL)


def test_ring_grad_of_grad(getkey):
    """A gradient penalty through ring attention: its custom VJP's backward pass is itself
    differentiated in reverse, so its block products must stay transposable."""
    q, k, v = (jax.random.normal(getkey(), (12, 2, 8)) for _ in range(3))
    ring = _one_device_ring(is_causal=True, block_sizes=(4, 4))
    single = lambda q, k, v: eqx_attention.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation="xla"
    )

    def penalty(attend):
        grads = jax.grad(lambda *x: jnp.sum(jnp.sin(attend(*x))), argnums=(0, 1, 2))
        return jax.grad(lambda *x: sum(jnp.sum(g**2) for g in grads(*x)), argnums=(0, 1, 2))

    for got, want in zip(penalty(ring)(q, k, v), penalty(single)(q, k, v), strict=True):
        assert jnp.allclose(got, want, atol=1e-4), float(jnp.max(jnp.abs(got - want)))


def test_skipping_survives_batching():
    # Block skipping depends only on device and tile indices, never on data, so vmapping
    # over a batch must keep a real `cond` (a batched predicate would turn it into a select
    # that computes every block).
    q = jnp.ones((2, 8, 4, 8))
    ring = _one_device_ring(batched=True, is_causal=True, block_sizes=(4, 4))
    assert "cond[" in str(jax.make_jaxpr(jax.grad(lambda q: ring(q, q, q).sum()))(q))


def test_data_masks_skip_tiles_under_vmap(monkeypatch):
    """Segment ids decide per example which tiles are visited: compact lists, not a cond
    (which vmap would turn into a select computing every tile). Counts the tile steps that
    run: under vmap each loop runs as long as the example needing the most steps."""
    seq, tile = 16, 4
    docs = jnp.array([[0] * 4 + [1] * 12, [0] * 12 + [1] * 4])
    counts = {"forward": 0, "backward": 0}

    def counting(name, step, q_arg):
        def wrapped(*args):
            def bump(x):
                counts[name] += np.size(x)

            jax.debug.callback(bump, args[q_arg].reshape(-1)[0])
            return step(*args)

        return wrapped

    monkeypatch.setattr(_sharding, "block_forward", counting("forward", _sharding.block_forward, 1))
    monkeypatch.setattr(
        _sharding, "block_backward", counting("backward", _sharding.block_backward, 0)
    )
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))

    def attend(q, ids):
        return eqx_attention.ring_attention(
            q, q, q, axis_name="seq", query_segment_ids=ids, kv_segment_ids=ids,
            block_sizes=(tile, tile),
        )  # fmt: skip

    ring = jax.shard_map(
        jax.vmap(attend), mesh=mesh, in_specs=(P(None, "seq"), P(None, "seq")),
        out_specs=P(None, "seq"),
    )  # fmt: skip
    q = jax.random.normal(jax.random.key(0), (2, seq, 2, 4))
    jax.block_until_ready(jax.grad(lambda q: jnp.sum(ring(q, docs) ** 2))(q))
    # Tile (i, j) is full when both tiles lie in one document, empty when in different ones.
    blocks = np.asarray(docs).reshape(2, seq // tile, tile)
    same = blocks[:, :, None, :, None] == blocks[:, None, :, None, :]
    full, some = same.all(axis=(3, 4)), same.any(axis=(3, 4))
    kinds = np.stack([full, some & ~full])  # [kind, example, q tile, k tile]
    forward = int(np.sum(np.max(kinds.sum(axis=3), axis=1)))
    backward = int(np.sum(np.max(kinds.sum(axis=2), axis=1)))
    assert forward < (seq // tile) ** 2
    assert counts == {"forward": 2 * forward, "backward": 2 * backward}


def test_zigzag_layout():
    idx = eqx_attention.zigzag_indices(8, 2)
    # Chunks 0 and 3 on the first shard, 1 and 2 on the second.
    assert idx.tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    x = jnp.arange(24).reshape(2, 12)
    y = eqx_attention.to_zigzag(x, 3, axis=1)
    assert y[0].tolist() == [0, 1, 10, 11, 2, 3, 8, 9, 4, 5, 6, 7]
    assert (eqx_attention.from_zigzag(y, 3, axis=1) == x).all()
    with pytest.raises(ValueError, match="multiple of 2 \\* num_shards = 6"):
        eqx_attention.zigzag_indices(8, 3)


def test_ring_validation():
    q = jnp.ones((6, 2, 4))
    with pytest.raises(ValueError, match="inside a jax.shard_map"):
        eqx_attention.ring_attention(q, q, q, axis_name="seq")
    with pytest.raises(ValueError, match="layout must be one of"):
        _one_device_ring(layout="striped")(q, q, q)
    with pytest.raises(ValueError, match="even local sequence length, got query.shape\\[0\\]=5"):
        _one_device_ring(layout="zigzag")(q[:5], q, q)
    with pytest.raises(ValueError, match="block_sizes must be positive"):
        _one_device_ring(block_sizes=(0, 4))(q, q, q)


def test_shard_heads_validation(getkey):
    mha = eqx_attention.MultiheadAttention(2, 8, key=getkey())
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    with pytest.raises(ValueError, match="'heads' is not an axis of the mesh"):
        eqx_attention.shard_heads(mha, mesh, "heads")

"""Decoding at memory speed: the decode loop, the position model and in-place caches."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea
from eqx_attention import _kernels as kernels
from eqx_attention._kernels import _decode

TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
HEADS, KV_HEADS, SIZE = 4, 2, 8


@pytest.fixture
def small_blocks(monkeypatch):
    """8-key decode blocks, so that short buffers span several (and end mid-block)."""
    monkeypatch.setattr(kernels, "DECODE_BLOCK_K", 8)


def _inputs(key, q_seq, kv_seq, batch=2):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (batch, q_seq, HEADS, SIZE)),
        jax.random.normal(kk, (batch, kv_seq, KV_HEADS, SIZE)),
        jax.random.normal(kv, (batch, kv_seq, KV_HEADS, SIZE)),
    )


def _options(name, kv_seq, key):
    """Per-example keyword arguments (batched arrays) and shared ones, for one option."""
    offsets, filled = jnp.array([9, 30]), jnp.array([13, 33])
    cache = dict(query_offset=offsets, key_value_seq_length=filled)
    slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])
    ring = jnp.stack([jax.random.permutation(key, kv_seq) - 3, jnp.arange(kv_seq)])
    batched, shared = {
        "cache": (cache, {}),
        "window": (cache, dict(local_window_size=(6, 0))),
        "sinks_softcap": (cache, dict(sinks=jnp.linspace(-1.0, 1.0, HEADS), logit_softcap=3.0)),
        "alibi": (
            cache,
            dict(score_mod=lambda s, h, q, k: s - slopes[h] * jnp.abs(q - k).astype(s.dtype)),
        ),
        "mask_mod": (cache, dict(mask_mod=lambda q, k: (q - k) % 3 != 1)),
        "bias_mask": (
            dict(bias=jax.random.normal(key, (2, HEADS, 1, kv_seq)), **cache),
            dict(mask=jnp.arange(kv_seq) % 5 != 2),
        ),
        "dropout": (
            dict(dropout_key=jax.random.split(key, 2), **cache),
            dict(dropout_p=0.3),
        ),
        # A ring buffer's slots: positions in no order, negative ones empty.
        "key_positions": (
            dict(query_offset=jnp.array([40, 50]), key_positions=ring),
            dict(local_window_size=(20, 0)),
        ),
        "no_offset": ({}, {}),
    }[name]
    return batched, dict(is_causal=True, **shared)


OPTIONS = [
    "cache", "window", "sinks_softcap", "alibi", "mask_mod", "bias_mask", "dropout",
    "key_positions", "no_offset",
]  # fmt: skip


@pytest.mark.parametrize("q_seq", [1, 5])
@pytest.mark.parametrize("option", OPTIONS)
def test_decode_loop_matches_reference(option, q_seq, small_blocks, getkey):
    """Forward and gradients of the decode loop against the materialising reference, under
    `vmap` with different offsets and fillings per example, on 37 keys (the last 8-key
    block overlaps the one before)."""
    kv_seq = 37
    q, k, v = _inputs(getkey(), q_seq, kv_seq)
    batched, shared = _options(option, kv_seq, getkey())

    def attend(q, k, v, batched, implementation):
        return ea.dot_product_attention(q, k, v, **batched, **shared, implementation=implementation)

    def loss(q, k, v, batched, implementation):
        out = jax.vmap(attend, in_axes=(0, 0, 0, 0, None))(q, k, v, batched, implementation)
        return jnp.sum(jnp.sin(out))

    outs = {
        impl: jax.vmap(attend, in_axes=(0, 0, 0, 0, None))(q, k, v, batched, impl)
        for impl in ("xla", "chunked")
    }
    assert jnp.allclose(outs["xla"], outs["chunked"], **TOL)
    grads = {impl: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, batched, impl) for impl in outs}
    for a, b in zip(grads["xla"], grads["chunked"], strict=True):
        assert jnp.allclose(a, b, **GRAD_TOL)


def test_decode_loop_differentiates_learned_parameters(small_blocks, getkey):
    q, k, v = _inputs(getkey(), 2, 40, batch=1)
    offset = dict(query_offset=20, key_value_seq_length=22, is_causal=True)

    def loss(sinks, slopes, implementation):
        def mod(s, h, qp, kp):
            return s - slopes[h] * jnp.abs(qp - kp).astype(s.dtype)

        out = ea.dot_product_attention(
            q[0], k[0], v[0], **offset, sinks=sinks, score_mod=mod, implementation=implementation
        )
        return jnp.sum(out**2)

    params = (jnp.linspace(-1.0, 1.0, HEADS), jnp.linspace(0.1, 0.4, HEADS))
    ref = jax.grad(loss, argnums=(0, 1))(*params, "xla")
    got = jax.grad(loss, argnums=(0, 1))(*params, "chunked")
    for a, b in zip(ref, got, strict=True):
        assert jnp.allclose(a, b, **GRAD_TOL)


def _count_blocks(monkeypatch):
    """Count the key blocks the decode loop folds in (per example under vmap)."""
    counts = []

    def counting(carry, q, *args, **kwargs):
        jax.debug.callback(lambda x: counts.append(np.size(x)), q.reshape(-1)[0])
        return ea_block_forward(carry, q, *args, **kwargs)

    ea_block_forward = _decode.block_forward
    monkeypatch.setattr(_decode, "block_forward", counting)
    return counts


@pytest.mark.parametrize(
    "options,blocks",
    [
        # 64 slots of 8: a filled length of 20 reads 3 blocks, not 8.
        (dict(query_offset=19, key_value_seq_length=20), 3),
        # A window starting at position 40 reads from block 5 to the query's block 6.
        (dict(query_offset=50, key_value_seq_length=51, local_window_size=(10, 0)), 2),
        (dict(query_offset=63, key_value_seq_length=64), 8),
    ],
)
def test_decode_loop_reads_only_visible_blocks(options, blocks, small_blocks, monkeypatch):
    counts = _count_blocks(monkeypatch)
    q, k, v = _inputs(jax.random.key(0), 1, 64, batch=2)
    batched = {n: jnp.full((2,), x) for n, x in options.items() if n != "local_window_size"}
    shared = {n: x for n, x in options.items() if n == "local_window_size"}

    def attend(q, k, v, batched):
        return ea.dot_product_attention(
            q, k, v, is_causal=True, **batched, **shared, implementation="chunked"
        )

    jax.block_until_ready(jax.jit(jax.vmap(attend))(q, k, v, batched))
    assert sum(counts) == 2 * blocks


def test_query_offset_and_key_positions_are_the_position_model(monkeypatch, getkey):
    """The blockwise kernel (through its block plan) with an offset and scattered key
    positions equals attention over the same keys sorted, with a bottom-right causal mask."""
    for name, size in (("BLOCK_Q", 16), ("BLOCK_K", 16), ("FINE_Q", 8), ("FINE_K", 8)):
        monkeypatch.setattr(kernels, name, size)
    q, k, v = _inputs(getkey(), 40, 50, batch=1)
    q, k, v = q[0], k[0], v[0]
    order = jax.random.permutation(getkey(), 50)
    positions = jnp.arange(50)[order] - 10  # ten empty slots (negative positions)
    got = ea.dot_product_attention(
        q, k[order], v[order], is_causal=True, local_window_size=(12, 0),
        query_offset=0, key_positions=positions, implementation="chunked",
    )  # fmt: skip
    # The same keys in position order: key j at position j - 10, so the first ten are empty
    # and query row i (at position i) is key 10 + i, the last 40 keys bottom-right aligned.
    expected = ea.dot_product_attention(
        q, k[10:], v[10:], is_causal=True, local_window_size=(12, 0), implementation="xla"
    )
    assert jnp.allclose(got, expected, **TOL)


def _mha(key, **kwargs):
    rope = ea.RotaryPositionalEmbedding(SIZE)
    return ea.MultiheadAttention(HEADS, 32, num_kv_heads=KV_HEADS, rope=rope, **kwargs, key=key)


@pytest.mark.parametrize("kind", ["linear", "sliding"])
def test_batched_decoding_equals_full_causal_pass(kind, small_blocks, getkey):
    """Random prefill lengths and step sizes, per example, decoded together under `vmap`
    through the decode loop, equal full (windowed) causal attention."""
    mha = _mha(getkey())
    seq, window = 40, 9
    x = jax.random.normal(getkey(), (2, seq, 32))
    full_options = dict(is_causal=True)
    if kind == "sliding":
        full_options["local_window_size"] = (window, 0)
    rng = np.random.default_rng(0)
    prefill = [int(n) for n in rng.integers(3, 12, size=2)]

    def empty():
        if kind == "sliding":
            return mha.init_sliding_window_cache(window)
        return mha.init_cache(seq)

    call = eqx.filter_jit(
        lambda mha, x, cache: mha(x, cache=cache, implementation="chunked", **full_options)
    )
    caches, outs = [], [[], []]
    for b, n in enumerate(prefill):
        out, cache = call(mha, x[b, :n], empty())
        caches.append(cache)
        outs[b].append(out)
    cache = jax.tree.map(lambda *leaves: jnp.stack(leaves), *caches)
    step = eqx.filter_jit(jax.vmap(call, in_axes=(None, 0, 0)))
    done = list(prefill)
    while max(done) + 4 <= seq:
        size = int(rng.integers(1, 5))
        size = min(size, seq - max(done))
        tokens = jnp.stack([x[b, d : d + size] for b, d in enumerate(done)])
        out, cache = step(mha, tokens, cache)
        for b in range(2):
            outs[b].append(out[b])
        done = [d + size for d in done]
    for b in range(2):
        expected = mha(x[b, : done[b]], **full_options, implementation="xla")
        assert jnp.allclose(jnp.concatenate(outs[b]), expected, **TOL)
    assert cache.length.tolist() == done


def test_mask_mod_sees_absolute_positions_with_a_cache(getkey):
    mha = _mha(getkey())
    x = jax.random.normal(getkey(), (20, 32))
    mod = ea.document_mask_mod(jnp.repeat(jnp.arange(4), 5))
    full = mha(x, is_causal=True, mask_mod=mod)
    out1, cache = mha(x[:7], cache=mha.init_cache(20), mask_mod=mod)
    out2, cache = mha(x[7:8], cache=cache, mask_mod=mod)
    out3, _ = mha(x[8:], cache=cache, mask_mod=mod)
    assert jnp.allclose(jnp.concatenate([out1, out2, out3]), full, **TOL)


def test_donated_step_writes_the_cache_in_place(getkey):
    """A decoding step jitted with the cache donated makes no copy of it: the buffers come
    back at the same address, and the compiled step holds no cache-sized temporary."""
    mha = _mha(getkey())
    cache = mha.init_cache(4096)
    step = eqx.filter_jit(lambda mha, cache, x: mha(x, cache=cache), donate="all-except-first")
    x = jnp.ones((1, 32))
    _, cache = step(mha, cache, x)
    addresses = cache.keys.unsafe_buffer_pointer(), cache.values.unsafe_buffer_pointer()
    out, new = step(mha, cache, jnp.ones((1, 32)))
    assert (new.keys.unsafe_buffer_pointer(), new.values.unsafe_buffer_pointer()) == addresses
    assert int(new.length) == 2

    params, static = eqx.partition(mha, eqx.is_array)

    def raw(params, cache, x):
        return eqx.combine(params, static)(x, cache=cache)

    compiled = jax.jit(raw, donate_argnums=1).lower(params, new, x).compile()
    memory = compiled.memory_analysis()
    cache_bytes = new.keys.nbytes + new.values.nbytes
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < cache_bytes // 4


def test_cache_of_another_dtype_is_refused(getkey):
    mha = _mha(getkey())
    cache = mha.init_cache(8)
    ints = eqx.tree_at(lambda c: (c.keys, c.values), cache, replace_fn=lambda a: a.astype(int))
    with pytest.raises(ValueError, match="must share one floating dtype, got keys.dtype=int"):
        mha(jnp.ones((1, 32)), cache=ints)
    mixed = eqx.tree_at(lambda c: c.values, cache, cache.values.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="values.dtype=bfloat16"):
        mha(jnp.ones((1, 32)), cache=mixed)

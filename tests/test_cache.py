import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import eqx_attention as ea

TOL = dict(atol=2e-5, rtol=2e-5)
SEQ = 12


def _mha(key, *, gqa, rope, **kwargs):
    return ea.MultiheadAttention(
        4,
        16,
        num_kv_heads=2 if gqa else None,
        rope=ea.RotaryPositionalEmbedding(4) if rope else None,
        use_query_bias=True,
        **kwargs,
        key=key,
    )


@eqx.filter_jit
def _step(mha, x, cache, window=None):
    return mha(x, cache=cache, local_window_size=window)


@eqx.filter_jit
def _call(mha, x, **kwargs):
    return mha(x, **kwargs)


def _decode(mha, x, cache, chunks, window=None):
    """Feed `x` in chunks of the given sizes; return the concatenated outputs and cache."""
    outs, start = [], 0
    for size in chunks:
        out, cache = _step(mha, x[start : start + size], cache, window)
        outs.append(out)
        start += size
    assert start == x.shape[0]
    return jnp.concatenate(outs), cache


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_decode_equals_full_causal_pass(getkey, gqa, rope):
    mha = _mha(getkey(), gqa=gqa, rope=rope, normalize_qk=rope)
    x = jax.random.normal(getkey(), (SEQ, 16))
    full = _call(mha, x, is_causal=True)
    step_by_step, cache = _decode(mha, x, mha.init_cache(16), [1] * SEQ)
    assert jnp.allclose(step_by_step, full, **TOL)
    assert int(cache.length) == SEQ
    prefill_then_steps, _ = _decode(mha, x, mha.init_cache(SEQ), [5, 1, 1, 3, 1, 1])
    assert jnp.allclose(prefill_then_steps, full, **TOL)


_PROPERTY_MHA = _mha(jax.random.key(7), gqa=True, rope=True)
_PROPERTY_X = jax.random.normal(jax.random.key(8), (SEQ, 16))


@settings(max_examples=6, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 3), min_size=1, max_size=SEQ).filter(lambda c: sum(c) <= SEQ),
    window=st.sampled_from([None, 2]),
)
def test_any_chunking_equals_full_pass(chunks, window):
    # Chunk sizes are few, so the jitted steps compile a handful of times in all.
    x = _PROPERTY_X[: sum(chunks)]
    full = _call(_PROPERTY_MHA, x, is_causal=True, local_window_size=window)
    linear, _ = _decode(_PROPERTY_MHA, x, _PROPERTY_MHA.init_cache(SEQ), chunks, window)
    assert jnp.allclose(linear, full, **TOL)
    if window is not None:
        cache = _PROPERTY_MHA.init_sliding_window_cache(window)
        ring, _ = _decode(_PROPERTY_MHA, x, cache, chunks, window)
        assert jnp.allclose(ring, full, **TOL)


@pytest.mark.parametrize("rope", [False, True])
def test_sliding_window_cache_equals_full_windowed_pass(getkey, rope):
    window = 3
    mha = _mha(getkey(), gqa=True, rope=rope)
    x = jax.random.normal(getkey(), (SEQ, 16))
    full = _call(mha, x, is_causal=True, local_window_size=window)
    cache = mha.init_sliding_window_cache(window)
    # Chunks longer and shorter than the window, and single steps past the window.
    out, cache = _decode(mha, x, cache, [5, 1, 2, 1, 1, 1, 1], window)
    assert jnp.allclose(out, full, **TOL)
    assert cache.keys.shape == (2, window, 4)  # head-major: num_kv_heads, window, qk_size
    assert int(cache.length) == SEQ
    # A linear cache with the same window gives the same result.
    out, _ = _decode(mha, x, mha.init_cache(SEQ), [5] + [1] * 7, window)
    assert jnp.allclose(out, full, **TOL)
    # A ring buffer larger than the window is fine too: the window hides the extra slots.
    out, _ = _decode(mha, x, mha.init_sliding_window_cache(window + 2), [4] * 3, window)
    assert jnp.allclose(out, full, **TOL)


def test_jit_compiles_once_per_chunk_size(getkey):
    mha = _mha(getkey(), gqa=True, rope=True)
    traces = []

    @eqx.filter_jit
    def step(mha, x, cache):
        traces.append(x.shape)
        return mha(x, cache=cache)

    x = jax.random.normal(getkey(), (SEQ, 16))
    cache = mha.init_cache(SEQ)
    _, cache = step(mha, x[:4], cache)
    for i in range(4, SEQ):
        _, cache = step(mha, x[i : i + 1], cache)
    assert traces == [(4, 16), (1, 16)]


def test_vmap_with_per_example_lengths(getkey):
    mha = _mha(getkey(), gqa=True, rope=True)
    x = jax.random.normal(getkey(), (2, SEQ, 16))
    prompt_lengths = [3, 6]
    # Prefill each example separately, then decode the batch together.
    caches = [_step(mha, x[b, :n], mha.init_cache(SEQ))[1] for b, n in enumerate(prompt_lengths)]
    cache = jax.tree.map(lambda *leaves: jnp.stack(leaves), *caches)
    assert cache.length.tolist() == prompt_lengths
    step = eqx.filter_jit(jax.vmap(lambda x, cache: mha(x, cache=cache)))
    outs = [[], []]
    for t in range(4):
        tokens = jnp.stack([x[b, n + t : n + t + 1] for b, n in enumerate(prompt_lengths)])
        out, cache = step(tokens, cache)
        for b in range(2):
            outs[b].append(out[b])
    for b, n in enumerate(prompt_lengths):
        full = _call(mha, x[b, : n + 4], is_causal=True)[n:]
        assert jnp.allclose(jnp.concatenate(outs[b]), full, **TOL)
    assert cache.length.tolist() == [7, 10]


def test_overflow_raises(getkey):
    mha = _mha(getkey(), gqa=False, rope=False)
    x = jax.random.normal(getkey(), (6, 16))
    _, cache = _step(mha, x[:4], mha.init_cache(5))
    _, full = _step(mha, x[4:5], cache)
    with pytest.raises(RuntimeError, match="KVCache overflow"):
        jax.block_until_ready(_step(mha, x[5:6], full))
    with pytest.raises(RuntimeError, match="KVCache overflow"):
        jax.block_until_ready(_step(mha, x[:2], cache))
    with pytest.raises(RuntimeError, match="KVCache overflow"):
        jax.block_until_ready(mha(x[5:6], cache=full))
    with pytest.raises(ValueError, match="cannot write 6 tokens into a KVCache of max_length=5"):
        mha(x, cache=mha.init_cache(5))
    # Per example under vmap: only the full example overflows, and that is an error.
    batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), cache, full)
    with pytest.raises(RuntimeError, match="KVCache overflow"):
        jax.block_until_ready(jax.vmap(lambda c: mha(x[5:6], cache=c))(batch))


def test_cache_argument_errors(getkey):
    mha = _mha(getkey(), gqa=False, rope=False)
    x = jnp.ones((2, 16))
    ring = mha.init_sliding_window_cache(3)
    with pytest.raises(ValueError, match="needs local_window_size"):
        mha(x, cache=ring)
    with pytest.raises(ValueError, match="left window <= 3"):
        mha(x, cache=ring, local_window_size=4)
    with pytest.raises(ValueError, match="not supported with a SlidingWindowKVCache"):
        mha(x, cache=ring, local_window_size=3, mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="key_ and value must be None"):
        mha(x, x, cache=mha.init_cache(4))
    with pytest.raises(ValueError, match="max_length must be positive"):
        mha.init_cache(0)


@pytest.mark.parametrize("other", ["fewer_kv_heads", "head_size"])
def test_cache_of_another_module_is_refused(other, getkey):
    """Written into silently, it would give an output wrong by O(1)."""
    mha = _mha(getkey(), gqa=True, rope=False)  # 4 heads, 2 key/value heads of 4
    foreign = {
        "fewer_kv_heads": ea.MultiheadAttention(4, 16, num_kv_heads=1, key=getkey()),
        "head_size": ea.MultiheadAttention(
            4, 16, qk_size=8, vo_size=8, num_kv_heads=2, key=getkey()
        ),
    }[other]
    x = jnp.ones((2, 16))
    for cache in (foreign.init_cache(8), foreign.init_sliding_window_cache(4)):
        with pytest.raises(ValueError, match=r"the cache's keys have \(num_kv_heads, size\)="):
            mha(x, cache=cache, local_window_size=4)


def test_cache_with_padding_mask_and_weights(getkey):
    mha = _mha(getkey(), gqa=True, rope=True)
    x = jax.random.normal(getkey(), (8, 16))
    # Hide key position 2 (a padding token in the prompt) from everything after it.
    keep = jnp.arange(8) != 2
    full = _call(mha, x, mask=keep[None, :] & ea.make_causal_mask(8))
    cache_keep = jnp.arange(10) != 2  # the mask indexes cache slots = positions
    prompt_mask = jnp.broadcast_to(cache_keep, (5, 10))
    out, cache = _call(mha, x[:5], cache=mha.init_cache(10), mask=prompt_mask)
    outs = [out]
    for t in range(5, 8):
        out, weights, cache = _call(
            mha, x[t : t + 1], cache=cache, mask=cache_keep[None, :], return_weights=True
        )
        outs.append(out)
        assert weights.shape == (4, 1, 10)
        assert jnp.allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert jnp.all(weights[:, :, 2] == 0) and jnp.all(weights[:, :, t + 1 :] == 0)
    assert jnp.allclose(jnp.concatenate(outs), full[:8], **TOL)


def test_bfloat16_cache(getkey):
    mha = _mha(getkey(), gqa=True, rope=False)
    cache = mha.init_cache(8, dtype=jnp.bfloat16)
    x = jax.random.normal(getkey(), (6, 16))
    out, cache = _decode(mha, x, cache, [3, 1, 1, 1])
    assert cache.keys.dtype == jnp.bfloat16 and out.dtype == jnp.float32
    assert jnp.allclose(out, mha(x, is_causal=True), atol=3e-2)


def test_matches_flax_nnx_decode(getkey):
    theirs = nnx.MultiHeadAttention(
        num_heads=4, in_features=16, num_kv_heads=2, decode=True, rngs=nnx.Rngs(3)
    )
    ours = ea.MultiheadAttention.from_flax_nnx(theirs)
    x = jax.random.normal(getkey(), (2, 7, 16))
    theirs.init_cache(x.shape)  # flax takes max_length from the sequence axis
    cache = jax.vmap(lambda _: ours.init_cache(7))(jnp.arange(2))
    step = eqx.filter_jit(jax.vmap(lambda x, c: ours(x, cache=c)))
    for t in range(7):
        want = theirs(x[:, t : t + 1])
        got, cache = step(x[:, t : t + 1], cache)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

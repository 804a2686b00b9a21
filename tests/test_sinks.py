"""Learned attention sinks: against jax.nn with one extra zero-valued key, in every
implementation, with every masking option, and through `MultiheadAttention` and its caches.

The reference never calls our kernels: the sink of head `h` is a key of zeros (so its logit
is `0 * scale`) whose value is zero, made visible to every query, with `sinks[h]` as its bias.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea
from eqx_attention import _kernels as kernels
from eqx_attention._functional import _prepare

SMALL_BLOCKS = {"BLOCK_Q": 4, "BLOCK_K": 8, "FINE_Q": 2, "FINE_K": 4}
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _visible(q_seq, kv_seq, *, is_causal, local_window_size, query_seq_length, kv_length):
    """Which pairs may attend, from explicit bottom-right position arithmetic."""
    q_pos = np.arange(q_seq)[:, None] + kv_seq - q_seq
    kv_pos = np.arange(kv_seq)[None, :]
    ok = np.ones((q_seq, kv_seq), bool)
    if is_causal:
        ok &= kv_pos <= q_pos
    if local_window_size is not None:
        left, right = local_window_size
        ok &= (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)
    if query_seq_length is not None:
        ok &= np.arange(q_seq)[:, None] < query_seq_length
    if kv_length is not None:
        ok &= kv_pos < kv_length
    return ok


def _reference(q, k, v, sinks, bias=None, **options):
    """jax.nn attention over the keys plus one zero key/value whose bias is the sink logit."""
    (q_seq, num_heads, qk_size), (kv_seq, num_kv_heads, _) = q.shape, k.shape
    ok = _visible(
        q_seq,
        kv_seq,
        is_causal=options.get("is_causal", False),
        local_window_size=options.get("local_window_size"),
        query_seq_length=options.get("query_seq_length"),
        kv_length=options.get("key_value_seq_length"),
    )
    ok = np.concatenate([ok, np.ones((q_seq, 1), bool)], axis=1)
    k = jnp.concatenate([k, jnp.zeros((1, num_kv_heads, qk_size))])
    v = jnp.concatenate([v, jnp.zeros((1,) + v.shape[1:])])
    bias = jnp.zeros((num_heads, q_seq, kv_seq)) if bias is None else bias
    bias = jnp.concatenate(
        [bias, jnp.broadcast_to(sinks[:, None, None], (num_heads, q_seq, 1))], -1
    )
    out = jax.nn.dot_product_attention(
        q[None], k[None], v[None], bias[None], jnp.asarray(ok)[None, None],
        scale=1 / math.sqrt(qk_size), implementation="xla",
    )[0]  # fmt: skip
    # Rows that see no real key get only the sink, whose value is zero: 0 either way.
    return out


def _value_and_grads(fn, args, cotangent):
    def run(args, cotangent):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    return jax.jit(run)(args, cotangent)


def _assert_close(actual, expected, what):
    names = ("out", "dq", "dk", "dv", "dsinks", "dbias")
    for name, a, e in zip(names[: len(actual)], actual, expected, strict=True):
        assert a.shape == e.shape, (what, name)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), err_msg=f"{what}: {name}", **TOL)


CASES = {
    "plain": (13, 13, 4, {}),
    "gqa_causal": (13, 13, 2, {"is_causal": True}),
    "bottom_right_causal": (9, 21, 2, {"is_causal": True}),
    "window": (17, 17, 4, {"local_window_size": (3, 1)}),
    "bias_gqa_causal": (13, 13, 2, {"is_causal": True, "bias": True}),
    "lengths": (13, 19, 1, {"query_seq_length": 10, "key_value_seq_length": 12}),
    # Rows 5.. see no key (window (1, 1) around them, keys only up to 3): only the sink.
    "empty_rows": (8, 8, 2, {"local_window_size": (1, 1), "key_value_seq_length": 3}),
    "causal_window_lengths": (
        21,
        21,
        2,
        {"is_causal": True, "local_window_size": (5, 0), "key_value_seq_length": 17},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_extra_zero_key(case, rng, monkeypatch):
    q_seq, kv_seq, num_kv_heads, options = CASES[case]
    options = dict(options)
    with_bias = options.pop("bias", False)
    q = _normal(rng, q_seq, 4, 8)
    k, v = _normal(rng, kv_seq, num_kv_heads, 8), _normal(rng, kv_seq, num_kv_heads, 8)
    # Spread over +-3 so that some heads' sinks dominate and others barely matter.
    sinks = 3 * _normal(rng, 4)
    cotangent = _normal(rng, q_seq, 4, 8)
    args = (q, k, v, sinks) + ((_normal(rng, 4, q_seq, kv_seq),) if with_bias else ())
    expected = _value_and_grads(lambda *a: _reference(*a, **options), args, cotangent)
    out, grads = expected
    assert np.all(np.isfinite(np.asarray(out)))
    for impl in ("xla", "chunked"):
        with monkeypatch.context() as patch:
            for name, size in SMALL_BLOCKS.items():
                patch.setattr(kernels, name, size)
            fn = lambda q, k, v, s, b=None, impl=impl: ea.dot_product_attention(  # noqa: E731
                q, k, v, b, sinks=s, implementation=impl, **options
            )
            got = _value_and_grads(fn, args, cotangent)
        _assert_close((got[0], *got[1]), (out, *grads), impl)


def test_real_blocks(rng):
    """Lengths spanning several of the kernel's real blocks, with unaligned ends."""
    q_seq = kv_seq = 1100
    q = _normal(rng, q_seq, 4, 16)
    k, v = _normal(rng, kv_seq, 2, 16), _normal(rng, kv_seq, 2, 16)
    sinks, cotangent = 3 * _normal(rng, 4), _normal(rng, q_seq, 4, 16)
    options = {"is_causal": True, "key_value_seq_length": 1050}
    args = (q, k, v, sinks)
    out, grads = _value_and_grads(lambda *a: _reference(*a, **options), args, cotangent)
    fn = lambda q, k, v, s: ea.dot_product_attention(  # noqa: E731
        q, k, v, sinks=s, implementation="chunked", **options
    )
    got, got_grads = _value_and_grads(fn, args, cotangent)
    _assert_close((got, *got_grads), (out, *grads), "chunked")


def test_weights_leave_the_sink_its_share(rng):
    q, k = _normal(rng, 7, 4, 8), _normal(rng, 7, 2, 8)
    sinks = jnp.array([-30.0, 0.0, 1.0, 30.0])
    weights = ea.dot_product_attention_weights(q, k, sinks=sinks, is_causal=True)
    plain = ea.dot_product_attention_weights(q, k, is_causal=True)
    totals = np.asarray(jnp.sum(weights, axis=-1))
    # The sink's share is exp(sink) / (exp(sink) + sum_j exp(l_j)).
    np.testing.assert_allclose(totals[0], 1.0, rtol=1e-6)
    assert np.all(totals[1:3] < 1.0) and np.all(totals[1:3] > 0.0)
    np.testing.assert_allclose(totals[3], 0.0, atol=1e-6)
    # The sink rescales rows and changes nothing else: relative weights stay the same.
    np.testing.assert_allclose(weights / totals[..., None], plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_no_key_gives_zeros_and_finite_gradients(impl, rng):
    q, k, v = _normal(rng, 5, 2, 4), _normal(rng, 5, 2, 4), _normal(rng, 5, 2, 4)
    sinks = _normal(rng, 2)

    def loss(q, k, v, sinks):
        out = ea.dot_product_attention(
            q, k, v, sinks=sinks, key_value_seq_length=0, implementation=impl
        )
        return jnp.sum(out), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sinks)
    assert np.all(np.asarray(out) == 0)
    for g in grads:
        assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_minus_infinity_sinks_are_no_sinks(impl, rng):
    q, k, v = _normal(rng, 9, 2, 4), _normal(rng, 9, 2, 4), _normal(rng, 9, 2, 4)
    options = {"is_causal": True, "implementation": impl}
    sunk = ea.dot_product_attention(q, k, v, sinks=jnp.full(2, -jnp.inf), **options)
    np.testing.assert_allclose(sunk, ea.dot_product_attention(q, k, v, **options), rtol=1e-6)


def test_forward_mode_through_the_reference(rng):
    q, k, v = _normal(rng, 6, 2, 4), _normal(rng, 6, 2, 4), _normal(rng, 6, 2, 4)
    sinks = _normal(rng, 2)

    def ours(s):
        return ea.dot_product_attention(q, k, v, sinks=s, is_causal=True, implementation="xla")

    def ref(s):
        return _reference(q, k, v, s, is_causal=True)

    tangent = _normal(rng, 2)
    _, jvp = jax.jvp(ours, (sinks,), (tangent,))
    _, ref_jvp = jax.jvp(ref, (sinks,), (tangent,))
    np.testing.assert_allclose(jvp, ref_jvp, **TOL)


def test_batched_sinks_under_vmap(rng):
    """Per-example sinks (e.g. a vmapped ensemble) through the blockwise custom VJP."""
    q, k, v = _normal(rng, 3, 600, 2, 4), _normal(rng, 3, 600, 1, 4), _normal(rng, 3, 600, 1, 4)
    sinks = _normal(rng, 3, 2)

    def loss(impl):
        def one(q, k, v, s):
            return ea.dot_product_attention(q, k, v, sinks=s, is_causal=True, implementation=impl)

        return lambda s: jnp.sum(jax.vmap(one)(q, k, v, s) ** 2)

    np.testing.assert_allclose(
        jax.grad(loss("chunked"))(sinks), jax.grad(loss("xla"))(sinks), **TOL
    )


def test_cudnn_refuses_sinks(rng, monkeypatch):
    """The automatic rule never hands sinks to cuDNN, which has no way to take them."""
    q, k, v = (_normal(rng, 8, 2, 8).astype(jnp.bfloat16) for _ in range(3))
    sunk, *_ = _prepare(q, k, v, sinks=jnp.zeros(2))
    plain, *_ = _prepare(q, k, v)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # as if on a GPU
    assert kernels.choose_implementation(plain, q.dtype, None, 8, 8) == "cudnn"
    # On a GPU, what cuDNN cannot run goes to the Pallas kernel.
    assert kernels.choose_implementation(sunk, q.dtype, None, 8, 8) == "pallas"
    with pytest.raises(ValueError, match="does not support sinks"):
        kernels.choose_implementation(sunk, q.dtype, "cudnn", 8, 8)


def test_sinks_shape_is_checked(rng):
    q, k, v = (_normal(rng, 8, 2, 8) for _ in range(3))
    with pytest.raises(Exception, match="sinks"):
        ea.dot_product_attention(q, k, v, sinks=jnp.zeros(3))


# --------------------------------------------------------------------------------------
# MultiheadAttention(use_sinks=True)


def _sink_mha(key, **kwargs):
    return ea.MultiheadAttention(
        4,
        16,
        num_kv_heads=2,
        rope=ea.RotaryPositionalEmbedding(4),
        normalize_qk=True,
        use_sinks=True,
        **kwargs,
        key=key,
    )


def test_mha_sinks_are_a_learned_field(getkey):
    mha = _sink_mha(getkey())
    assert mha.use_sinks and mha.sinks.shape == (4,) and mha.sinks.dtype == jnp.float32
    # normal(0, 0.02): small, so a new layer starts out close to ordinary softmax attention.
    assert 0 < float(jnp.max(jnp.abs(mha.sinks))) < 0.1
    plain = ea.MultiheadAttention(4, 16, num_kv_heads=2, key=getkey())
    assert not plain.use_sinks and plain.sinks is None
    assert jax.tree.structure(eqx.filter(mha, eqx.is_inexact_array)) != jax.tree.structure(
        eqx.filter(plain, eqx.is_inexact_array)
    )


def _decode(mha, x, cache, chunks, window=None):
    step = eqx.filter_jit(lambda mha, x, cache: mha(x, cache=cache, local_window_size=window))
    outs, start = [], 0
    for size in chunks:
        out, cache = step(mha, x[start : start + size], cache)
        outs.append(out)
        start += size
    return jnp.concatenate(outs)


@pytest.mark.parametrize("window", [None, 3])
def test_mha_cached_decoding_equals_full_causal(window, getkey):
    # Large sinks, so that a wrong sink anywhere moves the output visibly.
    mha = eqx.tree_at(lambda m: m.sinks, _sink_mha(getkey()), jnp.array([-2.0, 0.0, 1.0, 3.0]))
    x = jax.random.normal(getkey(), (11, 16))
    full = mha(x, is_causal=True, local_window_size=window)
    without = eqx.tree_at(lambda m: m.sinks, mha, jnp.full(4, -jnp.inf))
    assert not jnp.allclose(full, without(x, is_causal=True, local_window_size=window), atol=1e-3)
    chunks = [4, 1, 1, 3, 1, 1]
    linear = _decode(mha, x, mha.init_cache(16), chunks, window)
    np.testing.assert_allclose(linear, full, atol=2e-5, rtol=2e-5)
    if window is not None:
        ring = _decode(mha, x, mha.init_sliding_window_cache(window), chunks, window)
        np.testing.assert_allclose(ring, full, atol=2e-5, rtol=2e-5)


def test_mha_weights_with_sinks(getkey):
    mha = eqx.tree_at(lambda m: m.sinks, _sink_mha(getkey()), jnp.array([-2.0, 0.0, 1.0, 3.0]))
    x = jax.random.normal(getkey(), (9, 16))
    out, weights = mha(x, is_causal=True, return_weights=True)
    totals = np.asarray(jnp.sum(weights, axis=-1))
    assert np.all(totals < 1) and np.all(totals > 0)
    # Rows of heads with larger sinks give the sink more.
    assert np.all(np.diff(totals.mean(axis=1)) < 0)
    np.testing.assert_allclose(out, mha(x, is_causal=True), atol=1e-6)


def test_mha_sink_gradients_chunked_equal_xla_and_finite_differences(getkey, monkeypatch):
    """Training a sink: its gradient through the blockwise kernel, with dropout off."""
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)
    mha = _sink_mha(getkey())
    x = jax.random.normal(getkey(), (21, 16))
    target = jax.random.normal(getkey(), (21, 16))

    def loss(sinks, impl):
        model = eqx.tree_at(lambda m: m.sinks, mha, sinks)
        return jnp.mean((model(x, is_causal=True, implementation=impl) - target) ** 2)

    grad_chunked = jax.grad(loss)(mha.sinks, "chunked")
    grad_xla = jax.grad(loss)(mha.sinks, "xla")
    np.testing.assert_allclose(grad_chunked, grad_xla, rtol=1e-4, atol=1e-7)
    eps = 1e-2
    for h in range(4):
        step = jnp.zeros(4).at[h].set(eps)
        slope = (loss(mha.sinks + step, "xla") - loss(mha.sinks - step, "xla")) / (2 * eps)
        np.testing.assert_allclose(grad_xla[h], slope, rtol=2e-2, atol=1e-6)
    assert np.all(np.abs(np.asarray(grad_chunked)) > 0)


def test_mha_sinks_with_dropout(getkey):
    mha = _sink_mha(getkey(), dropout_p=0.5)
    x = jax.random.normal(getkey(), (9, 16))
    train = mha(x, is_causal=True, key=getkey())
    test = mha(x, is_causal=True, inference=True)
    assert np.all(np.isfinite(np.asarray(train))) and not jnp.allclose(train, test)

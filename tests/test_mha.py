import io

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from flax import nnx

import eqx_attention as ea

# Float32 results computed in a different order from the references.
TOL = dict(atol=2e-5, rtol=2e-5)


def _visible_mask(key, shape):
    # Every query row keeps key 0 visible: Equinox averages fully masked rows, we zero them.
    return jax.random.bernoulli(key, 0.6, shape).at[..., 0].set(True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(key_size=6, value_size=5, output_size=7, qk_size=3, vo_size=9),
        dict(use_query_bias=True, use_key_bias=True, use_value_bias=True, use_output_bias=True),
    ],
)
def test_from_equinox_matches(getkey, kwargs):
    theirs = eqx.nn.MultiheadAttention(4, 16, **kwargs, key=getkey())
    ours = ea.MultiheadAttention.from_equinox(theirs)
    q = jax.random.normal(getkey(), (5, 16))
    k = jax.random.normal(getkey(), (7, theirs.key_size))
    v = jax.random.normal(getkey(), (7, theirs.value_size))
    assert jnp.allclose(ours(q, k, v), theirs(q, k, v), **TOL)
    mask = _visible_mask(getkey(), (5, 7))
    assert jnp.allclose(ours(q, k, v, mask), theirs(q, k, v, mask), **TOL)
    head_mask = _visible_mask(getkey(), (4, 5, 7))
    assert jnp.allclose(ours(q, k, v, head_mask), theirs(q, k, v, head_mask), **TOL)


def test_from_equinox_vmap_and_fields(getkey):
    theirs = eqx.nn.MultiheadAttention(2, 8, dropout_p=0.25, key=getkey())
    ours = ea.MultiheadAttention.from_equinox(theirs)
    for name in ("query_proj", "key_proj", "value_proj", "output_proj"):
        assert getattr(ours, name).weight is getattr(theirs, name).weight
    assert ours.dropout.p == 0.25
    x = jax.random.normal(getkey(), (3, 6, 8))
    mask = _visible_mask(getkey(), (3, 6, 6))
    got = jax.vmap(lambda x, m: ours(x, x, x, m, inference=True))(x, mask)
    want = jax.vmap(lambda x, m: theirs(x, x, x, m, inference=True))(x, mask)
    assert jnp.allclose(got, want, **TOL)
    loop = jnp.stack([ours(x[i], mask=mask[i], inference=True) for i in range(3)])
    assert jnp.allclose(got, loop, **TOL)


def test_rope_matches_equinox_process_heads(getkey):
    # Equinox's documented pattern: RoPE applied in process_heads.
    theirs = eqx.nn.MultiheadAttention(2, 16, key=getkey())
    eqx_rope = eqx.nn.RotaryPositionalEmbedding(8)

    def process_heads(q, k, v):
        rotate = jax.vmap(eqx_rope, in_axes=1, out_axes=1)
        return rotate(q), rotate(k), v

    ours = eqx.tree_at(
        lambda m: m.rope,
        ea.MultiheadAttention.from_equinox(theirs),
        ea.RotaryPositionalEmbedding(8),
        is_leaf=lambda x: x is None,
    )
    x = jax.random.normal(getkey(), (9, 16))
    mask = ea.make_causal_mask(9)
    want = theirs(x, x, x, mask, process_heads=process_heads)
    assert jnp.allclose(ours(x, is_causal=True), want, **TOL)
    # process_heads also works here, after our own RoPE (none on this copy).
    plain = ea.MultiheadAttention.from_equinox(theirs)
    assert jnp.allclose(plain(x, x, x, mask, process_heads=process_heads), want, **TOL)


def _nnx_mha(num_kv_heads, normalize_qk, key, **kwargs):
    m = nnx.MultiHeadAttention(
        num_heads=4,
        in_features=16,
        qkv_features=32,
        out_features=12,
        num_kv_heads=num_kv_heads,
        normalize_qk=normalize_qk,
        decode=False,
        rngs=nnx.Rngs(0),
        **kwargs,
    )
    # Non-trivial biases and norm scales, so a mis-copied one would show.
    k1, k2, k3 = jax.random.split(key, 3)
    dtype = m.query.bias.dtype
    m.query.bias[...] = jax.random.normal(k1, m.query.bias.shape, dtype)
    m.out.bias[...] = jax.random.normal(k2, m.out.bias.shape, dtype)
    if normalize_qk:
        m.query_ln.scale[...] = 1 + jax.random.normal(k3, m.query_ln.scale.shape, dtype)
    return m


@pytest.mark.parametrize(
    "num_kv_heads, normalize_qk, is_causal",
    [(None, False, False), (2, False, True), (1, True, True), (4, True, False)],
)
def test_from_flax_nnx_matches(getkey, num_kv_heads, normalize_qk, is_causal):
    theirs = _nnx_mha(num_kv_heads, normalize_qk, getkey())
    ours = ea.MultiheadAttention.from_flax_nnx(theirs)
    assert ours.num_kv_heads == (num_kv_heads or 4)
    x = jax.random.normal(getkey(), (3, 10, 16))
    want = theirs(x, is_causal=is_causal)
    got = jax.vmap(lambda e: ours(e, is_causal=is_causal))(x)
    # Flax's LayerNorm uses the one-pass variance: slightly looser.
    assert jnp.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_from_flax_nnx_cross_attention_and_mask(getkey):
    theirs = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, in_kv_features=6, decode=False, rngs=nnx.Rngs(1)
    )
    ours = ea.MultiheadAttention.from_flax_nnx(theirs)
    q = jax.random.normal(getkey(), (2, 5, 8))
    kv = jax.random.normal(getkey(), (2, 7, 6))
    mask = _visible_mask(getkey(), (2, 2, 5, 7))
    want = theirs(q, kv, mask=mask)
    got = jax.vmap(lambda q, kv, m: ours(q, kv, mask=m))(q, kv, mask)
    assert jnp.allclose(got, want, **TOL)


def test_gqa_equals_repeated_heads(getkey):
    gqa = ea.MultiheadAttention(6, 12, num_kv_heads=2, use_key_bias=True, key=getkey())
    full = ea.MultiheadAttention(6, 12, use_key_bias=True, key=getkey())

    def repeat(w):
        # Query head n uses kv head n // group: repeat each kv head `group` times in place.
        return jnp.repeat(w.reshape(2, -1, *w.shape[1:]), 3, axis=0).reshape(-1, *w.shape[1:])

    full = eqx.tree_at(
        lambda m: (m.query_proj, m.output_proj, m.key_proj.bias, m.key_proj.weight),
        full,
        (
            gqa.query_proj,
            gqa.output_proj,
            repeat(gqa.key_proj.bias),
            repeat(gqa.key_proj.weight),
        ),
    )
    full = eqx.tree_at(lambda m: m.value_proj.weight, full, repeat(gqa.value_proj.weight))
    x = jax.random.normal(getkey(), (8, 12))
    assert jnp.allclose(gqa(x, is_causal=True), full(x, is_causal=True), **TOL)


def _reference(mha, x, mask):
    """Straight from the definition, for self-attention with a full (heads, q, kv) mask."""
    q = jax.vmap(mha.query_proj)(x).reshape(x.shape[0], mha.num_heads, -1)
    k = jax.vmap(mha.key_proj)(x).reshape(x.shape[0], mha.num_kv_heads, -1)
    v = jax.vmap(mha.value_proj)(x).reshape(x.shape[0], mha.num_kv_heads, -1)
    group = mha.num_heads // mha.num_kv_heads
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    logits = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(mha.qk_size)
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("hqk,khd->qhd", weights, v).reshape(x.shape[0], -1)
    return jax.vmap(mha.output_proj)(out), weights


def test_causal_window_bias_and_weights(getkey):
    mha = ea.MultiheadAttention(4, 16, num_kv_heads=2, key=getkey())
    x = jax.random.normal(getkey(), (11, 16))
    i, j = np.arange(11)[:, None], np.arange(11)[None, :]
    causal = jnp.asarray(j <= i)
    want, want_weights = _reference(mha, x, causal)
    got, weights = mha(x, is_causal=True, return_weights=True)
    assert jnp.allclose(got, want, **TOL)
    assert jnp.allclose(weights, want_weights, **TOL)
    # return_weights does not change the output.
    assert jnp.array_equal(got, mha(x, is_causal=True))
    window = jnp.asarray((j <= i) & (j >= i - 3))
    assert jnp.allclose(
        mha(x, is_causal=True, local_window_size=3), _reference(mha, x, window)[0], **TOL
    )
    # A -inf bias is a mask.
    bias = jnp.where(window, 0.0, -jnp.inf)
    assert jnp.allclose(mha(x, bias=bias), _reference(mha, x, window)[0], **TOL)
    chunked = mha(x, is_causal=True, implementation="chunked")
    assert jnp.allclose(chunked, want, **TOL)


def test_normalize_qk_is_per_head_layernorm(getkey):
    mha = ea.MultiheadAttention(2, 8, normalize_qk=True, key=getkey())
    mha = eqx.tree_at(lambda m: m.query_norm.weight, mha, jnp.array([1.0, 2.0, 0.5, 3.0]))
    x = jax.random.normal(getkey(), (5, 8))
    seen = {}

    def capture(q, k, v):
        seen["q"], seen["k"] = q, k
        return q, k, v

    mha(x, process_heads=capture)
    q = jax.vmap(mha.query_proj)(x).reshape(5, 2, 4)
    q = (q - q.mean(-1, keepdims=True)) / jnp.sqrt(q.var(-1, keepdims=True) + 1e-6)
    assert jnp.allclose(seen["q"], q * jnp.array([1.0, 2.0, 0.5, 3.0]), atol=1e-5)
    assert jnp.allclose(seen["k"].std(-1), 1.0, atol=1e-3)


def test_defaults_and_errors(getkey):
    mha = ea.MultiheadAttention(2, 8, key_size=6, value_size=6, key=getkey())
    q, kv = jnp.ones((3, 8)), jnp.ones((4, 6))
    assert jnp.array_equal(mha(q, kv), mha(q, kv, kv))
    square = ea.MultiheadAttention(2, 8, key=getkey())
    assert jnp.array_equal(square(q), square(q, q, q))
    with pytest.raises(ValueError, match="query_size=10 is not divisible by num_heads=4"):
        ea.MultiheadAttention(4, 10, key=getkey())
    ea.MultiheadAttention(4, 10, qk_size=3, vo_size=3, key=getkey())
    with pytest.raises(ValueError, match="num_heads=4 must be a positive multiple"):
        ea.MultiheadAttention(4, 8, num_kv_heads=3, key=getkey())
    with pytest.raises(ValueError, match=r"key_ must have shape \(seq, 6\)"):
        mha(q, q)
    with pytest.raises(ValueError, match=r"query must have shape \(seq, 8\)"):
        mha(kv, kv)
    with pytest.raises(ValueError, match="rope.embedding_size=6"):
        ea.MultiheadAttention(2, 8, rope=ea.RotaryPositionalEmbedding(6), key=getkey())
    with pytest.raises(ValueError, match=r"mask must have shape \(q_seq, kv_seq\)=\(3, 3\)"):
        square(q, mask=jnp.ones((3, 5), bool))
    with pytest.raises(ValueError, match=r"bias must have shape \(q_seq, kv_seq\)=\(3, 10\)"):
        square(q, cache=square.init_cache(10), bias=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="must not change the shapes"):
        square(q, process_heads=lambda q, k, v: (q, k[:1], v[:1]))


@pytest.mark.parametrize("shape", [(1, 7), (3, 1, 7), (1, 1, 7), (5, 1), (7,)])
def test_broadcastable_mask_and_bias(shape, getkey):
    """A mask or bias with size-1 axes (e.g. `(1, kv_seq)` for key padding), or of shape
    `(kv_seq,)`, means its broadcast to `(num_heads, q_seq, kv_seq)`, with or without a
    cache."""
    mha = ea.MultiheadAttention(3, 12, num_kv_heads=1, key=getkey())
    q, kv = jax.random.normal(getkey(), (5, 12)), jax.random.normal(getkey(), (7, 12))
    mask = jax.random.bernoulli(getkey(), 0.7, shape)
    bias = jax.random.normal(getkey(), shape)
    full = (3, 5, 7)
    expected = mha(q, kv, mask=jnp.broadcast_to(mask, full), bias=jnp.broadcast_to(bias, full))
    np.testing.assert_allclose(mha(q, kv, mask=mask, bias=bias), expected, **TOL)
    # Self-attention through a KVCache: the mask indexes the cache's 7 slots.
    prefix = mha(kv[:2], cache=mha.init_cache(7))[1]
    x = kv[2:]
    cached, _ = mha(x, cache=prefix, mask=mask, bias=bias)
    causal = jnp.arange(7)[None, :] <= jnp.arange(2, 7)[:, None]
    dense = jnp.broadcast_to(mask, full) & causal
    reference = mha(x, kv, mask=dense, bias=jnp.broadcast_to(bias, full))
    np.testing.assert_allclose(cached, reference, **TOL)


def test_mask_that_does_not_broadcast_is_an_error(getkey):
    mha = ea.MultiheadAttention(3, 12, key=getkey())
    q = jnp.ones((5, 12))
    # The run-time type check already knows q_seq; the module checks the rest.
    with pytest.raises(jaxtyping.TypeCheckError, match="mask"):
        mha(q, mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"mask must have shape .* got \(5, 3\)"):
        mha(q, mask=jnp.ones((5, 3), bool))
    with pytest.raises(ValueError, match=r"bias must have shape .* got \(2, 5, 5\)"):
        mha(q, bias=jnp.ones((2, 5, 5)))


def test_dropout(getkey):
    mha = ea.MultiheadAttention(2, 8, dropout_p=0.5, key=getkey())
    x = jax.random.normal(getkey(), (6, 8))
    clean = mha(x, inference=True)
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        mha(x)
    k = getkey()
    dropped = mha(x, key=k)
    assert not jnp.allclose(dropped, clean, atol=1e-3)
    assert jnp.array_equal(dropped, mha(x, key=k))
    assert not jnp.allclose(dropped, mha(x, key=getkey()), atol=1e-3)
    # eqx.nn.inference_mode reaches the `dropout` field; a per-call flag overrides it.
    frozen = eqx.nn.inference_mode(mha)
    assert jnp.array_equal(frozen(x, key=k), clean)
    assert jnp.array_equal(eqx.nn.inference_mode(frozen, value=False)(x, key=k), dropped)
    assert jnp.array_equal(frozen(x, key=k, inference=False), dropped)
    # p = 0 needs no key.
    no_drop = eqx.tree_at(lambda m: m.dropout.p, mha, 0.0)
    assert jnp.array_equal(no_drop(x), clean)


def test_serialisation_round_trip(getkey, tmp_path):
    kwargs = dict(num_kv_heads=1, normalize_qk=True, use_output_bias=True)
    mha = ea.MultiheadAttention(
        2, 8, rope=ea.RotaryPositionalEmbedding(4, theta=50.0), **kwargs, key=getkey()
    )
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, mha)
    buffer.seek(0)
    skeleton = ea.MultiheadAttention(
        2, 8, rope=ea.RotaryPositionalEmbedding(4, theta=50.0), **kwargs, key=getkey()
    )
    loaded = eqx.tree_deserialise_leaves(buffer, skeleton)
    for a, b in zip(jax.tree.leaves(mha), jax.tree.leaves(loaded), strict=True):
        assert jnp.array_equal(a, b)
    x = jax.random.normal(getkey(), (5, 8))
    assert jnp.array_equal(loaded(x, is_causal=True), mha(x, is_causal=True))


def test_bfloat16_parameters(getkey):
    mha = ea.MultiheadAttention(2, 8, dtype=jnp.bfloat16, key=getkey())
    x = jax.random.normal(getkey(), (5, 8)).astype(jnp.bfloat16)
    out = mha(x, is_causal=True)
    assert out.dtype == jnp.bfloat16
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_array(a) else a, mha)
    assert jnp.allclose(out.astype(jnp.float32), f32(x.astype(jnp.float32), is_causal=True),
                        atol=5e-2)  # fmt: skip


# --------------------------------------------------------------------------------------
# Equinox's conventions.


def test_equinox_positional_arguments_mean_the_same(getkey):
    """Every argument Equinox takes positionally means the same here, so a module built
    positionally for Equinox is the same module (same key split, same weights)."""
    args = (4, 32, 24, 20, 16, 8, 6, True, False, True, False, 0.25, True, jnp.float32)
    key = getkey()
    theirs = eqx.nn.MultiheadAttention(*args, key=key)
    ours = ea.MultiheadAttention(*args, key=key)
    assert ours.num_kv_heads == 4  # the example gave multi-query attention here
    for name in (
        "num_heads", "query_size", "key_size", "value_size", "output_size", "qk_size",
        "vo_size", "use_query_bias", "use_key_bias", "use_value_bias", "use_output_bias",
    ):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.dropout.p, ours.dropout.inference) == (0.25, True)
    for proj in ("query_proj", "key_proj", "value_proj", "output_proj"):
        assert eqx.tree_equal(getattr(ours, proj), getattr(theirs, proj)), proj
    # The new arguments are keyword only.
    with pytest.raises(TypeError):
        ea.MultiheadAttention(*args, 2, key=key)


def test_deterministic_is_deprecated_as_in_equinox(getkey):
    mha = ea.MultiheadAttention(2, 8, dropout_p=0.5, key=getkey())
    x = jax.random.normal(getkey(), (5, 8))
    with pytest.warns(UserWarning, match=r"deterministic=\.\.\.\) is deprecated"):
        out = mha(x, x, x, deterministic=True)
    np.testing.assert_array_equal(out, mha(x, x, x, inference=True))


def test_named_scope(getkey):
    """Like Equinox, the computation is labelled, so profiles and HLO show the module."""
    mha = ea.MultiheadAttention(2, 8, key=getkey())
    lowered = jax.jit(lambda x: mha(x)).lower(jnp.ones((5, 8)))
    assert "eqx_attention.MultiheadAttention" in lowered.as_text(debug_info=True)


def test_complex_inputs_are_refused(getkey):
    mha = ea.MultiheadAttention(2, 8, key=getkey())
    x = jnp.ones((5, 8), jnp.complex64)
    with pytest.raises(ValueError, match=r"complex inputs are unsupported.*query=complex64"):
        mha(x)


def test_dropout_rate_changes_without_recompiling(getkey):
    """`dropout_p` lives in the dynamic `dropout.p` field: replaced by an array with
    `eqx.tree_at`, a new rate reuses the compiled function."""
    mha = ea.MultiheadAttention(2, 8, dropout_p=0.5, key=getkey())
    x, key = jax.random.normal(getkey(), (6, 8)), getkey()
    traces = []

    @eqx.filter_jit
    def run(m):
        traces.append(None)
        return m(x, key=key)

    def with_rate(p):
        return eqx.tree_at(lambda m: m.dropout.p, mha, jnp.asarray(p, jnp.float32))

    low, high, zero = run(with_rate(0.1)), run(with_rate(0.6)), run(with_rate(0.0))
    assert len(traces) == 1
    assert not np.allclose(low, high)
    # A rate of zero keeps every weight: the output without dropout.
    np.testing.assert_allclose(zero, mha(x, inference=True), **TOL)
    # The same rate as a Python float draws the same dropout mask.
    np.testing.assert_allclose(
        high, eqx.tree_at(lambda m: m.dropout.p, mha, 0.6)(x, key=key), **TOL
    )


def test_from_flax_nnx_refuses_what_it_cannot_reproduce():
    dropout = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, dropout_rate=0.1, decode=False, rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match=r"broadcast_dropout=True and dropout_rate=0\.1"):
        ea.MultiheadAttention.from_flax_nnx(dropout)
    # Per-element dropout, and a computation dtype equal to the parameters', convert.
    fine = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, dropout_rate=0.1, broadcast_dropout=False,
        dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, decode=False, rngs=nnx.Rngs(0),
    )  # fmt: skip
    ours = ea.MultiheadAttention.from_flax_nnx(fine)
    assert ours.query_proj.weight.dtype == jnp.bfloat16 and ours.dropout.p == 0.1


# --------------------------------------------------------------------------------------
# Mixed precision: parameters in one dtype, computation in another.

# bfloat16 keeps 8 bits of mantissa; these outputs pass through three roundings of it.
BF16_TOL = dict(atol=5e-2, rtol=5e-2)
MIXED = [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)]


@pytest.mark.parametrize("param_dtype, compute_dtype", MIXED)
def test_mixed_precision_matches_flax_nnx(getkey, param_dtype, compute_dtype):
    """nnx's `dtype`/`param_dtype` convert to `compute_dtype` and the parameters' dtype,
    both ways round, and the outputs agree with Flax's."""
    theirs = _nnx_mha(2, True, getkey(), dtype=compute_dtype, param_dtype=param_dtype)
    ours = ea.MultiheadAttention.from_flax_nnx(theirs)
    assert ours.compute_dtype == compute_dtype
    params = jax.tree.leaves(eqx.filter(ours, eqx.is_inexact_array))
    assert {p.dtype for p in params} == {jnp.dtype(param_dtype)}
    x = jax.random.normal(getkey(), (3, 10, 16), param_dtype)
    want = theirs(x, is_causal=True)
    got = jax.vmap(lambda e: ours(e, is_causal=True))(x)
    assert got.dtype == want.dtype == compute_dtype
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), **BF16_TOL
    )
    # Flax's default computation dtype (None: the promoted one) is ours too.
    default = _nnx_mha(2, True, getkey(), param_dtype=param_dtype)
    assert ea.MultiheadAttention.from_flax_nnx(default).compute_dtype is None


@pytest.mark.parametrize("param_dtype, compute_dtype", MIXED)
def test_compute_dtype_casts_inputs_and_parameters(getkey, param_dtype, compute_dtype):
    """The computation is the module's with its parameters cast to `compute_dtype`, on the
    inputs cast to it: heads, output and cache are in `compute_dtype`, the parameters and
    their gradients stay in theirs, and strict promotion finds no implicit cast."""
    kwargs = dict(num_kv_heads=2, use_query_bias=True, use_output_bias=True, use_sinks=True,
                  normalize_qk=True,
                  rope=ea.RotaryPositionalEmbedding(4), dtype=param_dtype)  # fmt: skip
    key = getkey()
    mixed = ea.MultiheadAttention(4, 16, compute_dtype=compute_dtype, **kwargs, key=key)
    cast = jax.tree.map(lambda a: a.astype(compute_dtype) if eqx.is_inexact_array(a) else a,
                        ea.MultiheadAttention(4, 16, **kwargs, key=key))  # fmt: skip
    x = jax.random.normal(getkey(), (9, 16))  # float32, whatever the module's dtypes
    seen = []

    def process_heads(q, k, v):
        seen.append({q.dtype, k.dtype, v.dtype})
        return q, k, v

    with jax.numpy_dtype_promotion("strict"):
        out = mixed(x, is_causal=True, process_heads=process_heads)
        cache = mixed.init_cache(9)
        step, cache = mixed(x[:5], cache=cache)
    assert seen == [{jnp.dtype(compute_dtype)}]
    assert out.dtype == step.dtype == cache.keys.dtype == compute_dtype
    np.testing.assert_array_equal(out, cast(x.astype(compute_dtype), is_causal=True))
    np.testing.assert_allclose(
        np.asarray(step, np.float32), np.asarray(out[:5], np.float32), **BF16_TOL
    )

    def loss(m):
        return jnp.sum(m(x, is_causal=True).astype(jnp.float32) ** 2)

    grads = jax.tree.leaves(eqx.filter(eqx.filter_grad(loss)(mixed), eqx.is_inexact_array))
    assert {g.dtype for g in grads} == {jnp.dtype(param_dtype)}
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_compute_dtype_is_checked(getkey):
    with pytest.raises(ValueError, match=r"compute_dtype must be a floating dtype, got int32"):
        ea.MultiheadAttention(2, 8, compute_dtype=jnp.int32, key=getkey())
    mha = ea.MultiheadAttention(2, 8, compute_dtype="bfloat16", key=getkey())
    assert mha.compute_dtype == jnp.bfloat16 and mha.query_proj.weight.dtype == jnp.float32
    assert ea.MultiheadAttention(2, 8, key=getkey()).compute_dtype is None


# --------------------------------------------------------------------------------------
# score_mod


def test_score_mod_is_passed_to_the_core(getkey):
    """A learned ALiBi-style `score_mod` equals the same bias as an array: `head` is the
    query head (also with grouped-query attention), the positions are those `is_causal`
    and the cache use, and gradients reach the arrays it closes over."""
    mha = ea.MultiheadAttention(4, 16, num_kv_heads=2, key=getkey())
    x = jax.random.normal(getkey(), (7, 16))
    slopes = jnp.array([0.5, 0.25, 0.125, 1.0])

    def alibi(slopes):
        return lambda score, head, q, k: score - slopes[head] * jnp.abs(q - k)

    positions = jnp.arange(7)
    bias = -slopes[:, None, None] * jnp.abs(positions[:, None] - positions[None, :])
    out, weights = mha(x, is_causal=True, score_mod=alibi(slopes), return_weights=True)
    want, want_weights = mha(x, is_causal=True, bias=bias, return_weights=True)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(weights, want_weights, **TOL)
    # With a cache the mod sees absolute positions.
    first, cache = mha(x[:4], cache=mha.init_cache(7), score_mod=alibi(slopes))
    rest, _ = mha(x[4:], cache=cache, score_mod=alibi(slopes))
    np.testing.assert_allclose(jnp.concatenate([first, rest]), out, **TOL)
    grad = jax.grad(lambda s: jnp.sum(mha(x, is_causal=True, score_mod=alibi(s)) ** 2))(slopes)
    want_grad = jax.grad(
        lambda s: jnp.sum(mha(x, is_causal=True, bias=-s[:, None, None] * jnp.abs(
            positions[:, None] - positions[None, :])) ** 2)
    )(slopes)  # fmt: skip
    np.testing.assert_allclose(grad, want_grad, atol=1e-4, rtol=1e-4)


def test_numpy_inputs(getkey):
    """NumPy inputs and masks are accepted, as by Equinox's module."""
    mha = ea.MultiheadAttention(2, 8, key=getkey())
    x = np.random.default_rng(0).standard_normal((5, 8), np.float32)
    mask = np.tril(np.ones((5, 5), bool))
    np.testing.assert_allclose(mha(x, mask=mask), mha(jnp.asarray(x), is_causal=True), **TOL)


def test_no_false_alarm_under_debug_infs(getkey):
    """Masks, windows and both caches, eagerly under `jax.debug_infs(True)`: the masking
    uses finite values, so nothing raises FloatingPointError."""
    mha = ea.MultiheadAttention(2, 8, num_kv_heads=1, key=getkey())
    x = jax.random.normal(getkey(), (6, 8))
    with jax.debug_infs(True):
        mha(x, is_causal=True, local_window_size=(2, 0), mask=jnp.arange(6) < 4)
        cache = mha.init_cache(8)
        _, cache = mha(x[:3], cache=cache)
        mha(x[3:4], cache=cache)
        ring = mha.init_sliding_window_cache(2)
        for token in x[:3]:
            out, ring = mha(token[None], cache=ring, local_window_size=(2, 0))
    assert np.all(np.isfinite(np.asarray(out)))

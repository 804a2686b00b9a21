"""The cases of Flax's `tests/linen/linen_attention_test.py` and
`tests/nnx/nn/attention_test.py`, run on eqx_attention.

Where Flax checks its module against itself (shapes, dropout keys, decoding, receptive
fields) the same property is checked on ours; where a number can be compared, ours is
converted from a `flax.nnx.MultiHeadAttention` and compared with it. Flax works on batches,
we on one example: batches are `jax.vmap`ped.
"""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eqx_attention as ea

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _nnx(in_features=3, num_heads=2, qkv_features=6, out_features=6, **kwargs):
    return nnx.MultiHeadAttention(
        num_heads=num_heads, in_features=in_features, qkv_features=qkv_features,
        out_features=out_features, decode=False, rngs=nnx.Rngs(0), **kwargs,
    )  # fmt: skip


def test_basic():
    """nnx's test_basic: a batch of one, `(1, 7, 3) -> (1, 7, 6)`, equal to Flax's."""
    theirs = _nnx()
    ours = ea.MultiheadAttention.from_flax_nnx(theirs)
    x = jax.random.normal(jax.random.key(0), (1, 7, 3))
    out = jax.vmap(ours)(x)
    assert out.shape == (1, 7, 6) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, theirs(x), **TOL)


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("normalize_qk", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_nnx_equivalence(dtype, param_dtype, use_bias, normalize_qk, decode):
    """nnx's TestLinenConsistency, with ours in place of Linen: `use_bias`, `normalize_qk`,
    the computation `dtype` and `param_dtype` (equal or not: ours keeps the parameters in
    theirs and computes in `compute_dtype`), and `decode` (Flax's cache, one token per call,
    against ours). Inputs are random rather than Flax's ones, which no attention weight
    could change."""
    theirs = _nnx(
        use_bias=use_bias, normalize_qk=normalize_qk, dtype=dtype, param_dtype=param_dtype
    )
    ours = ea.MultiheadAttention.from_flax_nnx(theirs)
    assert ours.query_proj.weight.dtype == param_dtype
    x = jax.random.normal(jax.random.key(0), (1, 5, 3), param_dtype)
    if decode:
        theirs.set_attributes(decode=True)
        theirs.init_cache(x.shape, dtype=dtype)
        want = jnp.concatenate([theirs(x[:, i : i + 1]) for i in range(x.shape[1])], axis=1)

        def step(cache, token):
            out, cache = ours(token[None], cache=cache)
            return cache, out[0]

        _, out = jax.lax.scan(step, ours.init_cache(x.shape[1]), x[0])
        out = out[None]
    else:
        want = theirs(x)
        out = jax.vmap(ours)(x)
    assert out.dtype == want.dtype == dtype
    half = jnp.float16 in (dtype, param_dtype)
    tol = {"atol": 2e-2, "rtol": 2e-2} if half else TOL
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), **tol)


def test_multihead_encoder_decoder_attention():
    """Linen's test with extra leading axes `(4, 2, 3, 5)`: one vmap per axis."""
    ours = ea.MultiheadAttention(8, 5, qk_size=2, vo_size=2, key=jax.random.key(0))
    q = jnp.ones((4, 2, 3, 5))
    assert jax.vmap(jax.vmap(ours))(q).shape == q.shape


def test_dtype_infer_refuses_complex():
    """Linen infers complex64 from complex inputs; we refuse them, saying so."""
    ours = ea.MultiheadAttention(8, 8, key=jax.random.key(0))
    with pytest.raises(ValueError, match="complex inputs are unsupported"):
        ours(jnp.ones((6, 8), jnp.complex64))


def test_dropout_keys():
    """Linen's explicit-dropout test: one key gives one output, two keys two; inference
    and a zero rate ignore the key."""
    attn = ea.MultiheadAttention(8, 16, dropout_p=0.5, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 16))
    k1, k2 = jax.random.split(jax.random.key(2))
    a, b, c = attn(x, key=k1), attn(x, key=k1), attn(x, key=k2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    clean = attn(x, inference=True)
    np.testing.assert_array_equal(attn(x, key=k1, inference=True), clean)
    no_dropout = ea.MultiheadAttention(8, 16, key=jax.random.key(0))
    np.testing.assert_array_equal(no_dropout(x, key=k1), no_dropout(x, key=k2))
    np.testing.assert_allclose(no_dropout(x), clean, **TOL)


def test_causal_mask_1d():
    """Linen's make_causal_mask and ours agree (ours per example, without the head axis)."""
    theirs = linen.make_causal_mask(jnp.ones((3, 16)))
    assert theirs.shape == (3, 1, 16, 16)
    np.testing.assert_array_equal(ea.make_causal_mask(16), theirs[0, 0])


@pytest.mark.parametrize("num_kv_heads", [3, 1])
def test_decoding(num_kv_heads):
    """Linen's test_decoding: feeding the tokens one at a time through a cache gives the
    outputs of one call with Flax's causal mask."""
    seq, heads, features = 5, 3, 4
    attn = ea.MultiheadAttention(
        heads, heads * features, num_kv_heads=num_kv_heads, key=jax.random.key(0)
    )
    x = jax.random.normal(jax.random.key(1), (seq, heads * features))
    # Flax's masks are float32 0/1 arrays; ours are boolean (a float array is a bias).
    mask = linen.make_causal_mask(jnp.ones((1, seq)))[0, 0].astype(bool)
    want = attn(x, mask=mask)

    def step(cache, token):
        out, cache = attn(token[None], cache=cache)
        return cache, out[0]

    _, got = jax.lax.scan(step, attn.init_cache(seq), x)
    np.testing.assert_allclose(got, want, **TOL)


def test_autoregressive_receptive_field_1d():
    """Linen's receptive-field test: with a causal mask, output `i` depends on exactly the
    inputs `0..i`."""
    length = 10
    attn = ea.MultiheadAttention(1, 1, key=jax.random.key(0))
    attn = jax.tree.map(jnp.ones_like, attn)  # Linen's ones kernel_init
    x = jax.random.normal(jax.random.key(1), (length, 1))
    jacobian = jax.jacobian(lambda x: attn(x, is_causal=True)[:, 0])(x)[:, :, 0]
    depends = np.abs(np.asarray(jacobian)) > 1e-5
    np.testing.assert_array_equal(depends, np.tril(np.ones((length, length), bool)))


def test_multihead_kv_args():
    """Linen's test_multihead_kv_args: `inputs_k` defaults to the query and `inputs_v` to
    `inputs_k`; here `key_` and `value`."""
    attn = ea.MultiheadAttention(8, 5, qk_size=2, vo_size=2, key=jax.random.key(0))
    query = jax.random.uniform(jax.random.key(1), (3, 5))
    kv = jax.random.uniform(jax.random.key(2), (9, 5))
    np.testing.assert_array_equal(attn(query, kv, kv), attn(query, kv))
    np.testing.assert_array_equal(attn(query, query, query), attn(query))
    with pytest.raises(ValueError, match="key_ and value must be None"):
        attn(query, kv, cache=attn.init_cache(4))


def test_sow_attention_weights():
    """Linen's and nnx's sow test: the weights of a layer that returns them are
    `(batch, heads, q, kv)` once vmapped; layers that do not, return only the output."""
    x = jnp.ones((4, 6, 8))
    layers = [ea.MultiheadAttention(8, 8, key=jax.random.key(i)) for i in range(3)]
    out, weights = jax.vmap(lambda x: layers[0](x, return_weights=True))(x)
    assert weights.shape == (4, 8, 6, 6)
    np.testing.assert_allclose(jnp.sum(weights, axis=-1), 1.0, **TOL)
    assert jax.vmap(layers[1])(out).shape == (4, 6, 8)


def test_autoregressive_decode_with_x64():
    """Linen's and nnx's x64 test: decoding from a cache also works in 64-bit mode."""
    with jax.enable_x64(True):
        attn = ea.MultiheadAttention(2, 4, key=jax.random.key(0))
        x = jnp.ones((4, 4))
        cache = attn.init_cache(4)
        assert cache.keys.shape == (2, 4, 2) and cache.keys.dtype == jnp.float64
        y1, cache = attn(x[:1], cache=cache)
        y2, cache = attn(x[1:2], cache=cache)
    assert y1.shape == y2.shape == (1, 4)
    assert y1.dtype == jnp.float64

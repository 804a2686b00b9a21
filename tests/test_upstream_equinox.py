"""The attention and RoPE cases of Equinox's `tests/test_nn.py`, run on eqx_attention.

Under Equinox's own test settings: strict dtype promotion and rank promotion raising.
Where Equinox hard-codes expected numbers, the same numbers are expected here; where it
checks its module against itself, ours is also compared with `equinox.nn`'s.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.dtypes import TypePromotionError

import eqx_attention as ea


@pytest.fixture(autouse=True)
def equinox_settings():
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


def test_dot_product_attention_weights():
    """Equinox's values: one query, two keys, per-example functions (a head axis of one)."""
    q = jnp.array([[0.0, 2**0.5]])[:, None]
    k = jnp.array([[1.0, 0.0], [0.0, 1.0]])[:, None]
    weights = ea.dot_product_attention_weights(q, k)[0]
    assert weights.shape == (1, 2)
    np.testing.assert_allclose(weights, jnp.array([[1, jnp.e]]) / (1 + jnp.e), rtol=1e-6)
    weights = ea.dot_product_attention_weights(q, k, mask=jnp.array([[True, False]]))[0]
    np.testing.assert_allclose(weights, jnp.array([[1.0, 0.0]]))
    # Half-precision logits do not saturate the softmax (Equinox: max < 1).
    q16 = jnp.array([[1.0]], jnp.float16)[:, None]
    k16 = jnp.array([[9.0], [1.0]], jnp.float16)[:, None]
    assert ea.dot_product_attention_weights(q16, k16).max() < 1


def test_dot_product_attention():
    q = jnp.array([[0.0, 2**0.5]])[:, None]
    k = jnp.array([[1.0, 0.0], [0.0, 1.0]])[:, None]
    v = jnp.array([[1.0], [0.0]])[:, None]
    out = ea.dot_product_attention(q, k, v)[:, 0]
    assert out.shape == (1, 1)
    np.testing.assert_allclose(out, jnp.array([[1 / (1 + jnp.e)]]), rtol=1e-6)
    out = ea.dot_product_attention(q, k, v, mask=jnp.array([[True, False]]))[:, 0]
    assert out == jnp.array([[1.0]])


def test_multihead_attention(getkey):
    attn = ea.MultiheadAttention(
        num_heads=2, query_size=3, key_size=5, value_size=7, output_size=11, qk_size=13,
        vo_size=17, key=getkey(),
    )  # fmt: skip
    q = jax.random.uniform(getkey(), (19, 3))
    k = jax.random.uniform(getkey(), (23, 5))
    v = jax.random.uniform(getkey(), (23, 7))
    assert attn(q, k, v).shape == (19, 11)

    # Equinox's hand-computed values, with every weight arange(16).reshape(4, 4).
    attn = ea.MultiheadAttention(num_heads=2, query_size=4, key=getkey())
    attn = eqx.tree_at(
        lambda m: (
            m.query_proj.weight,
            m.key_proj.weight,
            m.value_proj.weight,
            m.output_proj.weight,
        ),
        attn,
        [jnp.arange(16.0).reshape(4, 4) for _ in range(4)],
    )
    x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    expected = jnp.array([[680.0, 1960.0, 3240.0, 4520.0]])
    np.testing.assert_allclose(attn(x, x, x), expected)
    x = jnp.arange(1, 13, dtype=jnp.float32).reshape(3, 4)
    for shape in ((2, 3, 3), (3, 3)):
        mask = jnp.broadcast_to(jnp.array([True, False, False]), shape)
        np.testing.assert_allclose(attn(x, x, x, mask), jnp.broadcast_to(expected, (3, 4)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_multihead_attention_matches_equinox(dtype, getkey):
    """Beyond Equinox's own test: the same module in every float dtype, converted with
    `from_equinox`, gives Equinox's numbers (strict promotion holds on both sides)."""
    theirs = eqx.nn.MultiheadAttention(
        4, 16, 12, 10, 8, 6, 5, True, True, True, True, dtype=dtype, key=getkey()
    )
    ours = ea.MultiheadAttention.from_equinox(theirs)
    q = jax.random.normal(getkey(), (7, 16), dtype)
    kv = jax.random.normal(getkey(), (9, 12), dtype)
    v = jax.random.normal(getkey(), (9, 10), dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == jnp.float32 else {"atol": 3e-2, "rtol": 3e-2}
    got, want = ours(q, kv, v), theirs(q, kv, v)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


def test_multihead_attention_inference(getkey):
    attn = ea.MultiheadAttention(num_heads=2, query_size=10, dropout_p=0.5, key=getkey())
    x = jax.random.normal(getkey(), (3, 10))
    assert jnp.all(attn(x, x, x, key=getkey(), inference=True) == attn(x, x, x, inference=True))
    assert jnp.any(attn(x, x, x, key=getkey()) != attn(x, x, x, key=getkey()))
    attn2 = ea.MultiheadAttention(
        num_heads=2, query_size=10, dropout_p=0.5, inference=True, key=getkey()
    )
    assert jnp.all(attn2(x, x, x, key=getkey()) == attn2(x, x, x, key=getkey()))
    # eqx.nn.inference_mode reaches the dropout field.
    attn3 = eqx.nn.inference_mode(attn)
    assert jnp.all(attn3(x, x, x, key=getkey()) == attn3(x, x, x, key=getkey()))


def test_multihead_attention_deterministic(getkey):
    attn = ea.MultiheadAttention(num_heads=2, query_size=10, dropout_p=0.5, key=getkey())
    x = jax.random.normal(getkey(), (3, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z1 = attn(x, x, x, key=getkey(), deterministic=True)
        z2 = attn(x, x, x, deterministic=True)
    assert jnp.all(z1 == z2)


def test_multihead_attention_in_sequential(getkey):
    """Equinox's layers compose in `eqx.nn.Sequential`, which passes `key=`."""
    model = eqx.nn.Sequential(
        [
            ea.SinusoidalPositionalEmbedding(8),
            ea.MultiheadAttention(2, 8, key=getkey()),
            ea.FeedForward(8, key=getkey()),
        ]
    )
    assert model(jnp.ones((5, 8)), key=getkey()).shape == (5, 8)


def test_rope_embeddings_shapes(getkey):
    rope = ea.RotaryPositionalEmbedding(32)
    heads = jax.random.normal(getkey(), (8, 4, 32))
    rotated = jax.vmap(rope, in_axes=1, out_axes=1)(heads)
    assert rotated.shape == (8, 4, 32)


def test_rope_embeddings_freqs():
    """Equinox's table (from Meta's RoPE code): the cosines and sines of positions 0..15
    at the 4 frequencies of an 8-channel embedding, recovered by rotating unit vectors."""
    expected = jnp.array(
        [
            [1.0000 + 0.0000j, 1.0000 + 0.0000j, 1.0000 + 0.0000j, 1.0000 + 0.0000j],
            [0.5403 + 0.8415j, 0.9950 + 0.0998j, 0.9999 + 0.0100j, 1.0000 + 0.0010j],
            [-0.4161 + 0.9093j, 0.9801 + 0.1987j, 0.9998 + 0.0200j, 1.0000 + 0.0020j],
            [-0.9900 + 0.1411j, 0.9553 + 0.2955j, 0.9996 + 0.0300j, 1.0000 + 0.0030j],
            [-0.6536 - 0.7568j, 0.9211 + 0.3894j, 0.9992 + 0.0400j, 1.0000 + 0.0040j],
            [0.2837 - 0.9589j, 0.8776 + 0.4794j, 0.9988 + 0.0500j, 1.0000 + 0.0050j],
            [0.9602 - 0.2794j, 0.8253 + 0.5646j, 0.9982 + 0.0600j, 1.0000 + 0.0060j],
            [0.7539 + 0.6570j, 0.7648 + 0.6442j, 0.9976 + 0.0699j, 1.0000 + 0.0070j],
            [-0.1455 + 0.9894j, 0.6967 + 0.7174j, 0.9968 + 0.0799j, 1.0000 + 0.0080j],
            [-0.9111 + 0.4121j, 0.6216 + 0.7833j, 0.9960 + 0.0899j, 1.0000 + 0.0090j],
            [-0.8391 - 0.5440j, 0.5403 + 0.8415j, 0.9950 + 0.0998j, 0.9999 + 0.0100j],
            [0.0044 - 1.0000j, 0.4536 + 0.8912j, 0.9940 + 0.1098j, 0.9999 + 0.0110j],
            [0.8439 - 0.5366j, 0.3624 + 0.9320j, 0.9928 + 0.1197j, 0.9999 + 0.0120j],
            [0.9074 + 0.4202j, 0.2675 + 0.9636j, 0.9916 + 0.1296j, 0.9999 + 0.0130j],
            [0.1367 + 0.9906j, 0.1700 + 0.9854j, 0.9902 + 0.1395j, 0.9999 + 0.0140j],
            [-0.7597 + 0.6503j, 0.0707 + 0.9975j, 0.9888 + 0.1494j, 0.9999 + 0.0150j],
        ]
    )
    rope = ea.RotaryPositionalEmbedding(8)
    # Split-half pairing: channel i pairs with i + 4, so (1, 0) in channels (i, i + 4)
    # rotates to (cos, sin) there.
    ones_first_half = jnp.broadcast_to(jnp.array([1.0] * 4 + [0.0] * 4), (16, 8))
    rotated = rope(ones_first_half)
    np.testing.assert_allclose(rotated[:, :4], expected.real, atol=1e-4)
    np.testing.assert_allclose(rotated[:, 4:], expected.imag, atol=1e-4)


ROPE_VALUES = jnp.array(
    [
        [0.0, 1.0, 2.0, 3.0],
        [-2.887617, 4.9297514, 6.6076975, 7.0496492],
        [-12.422148, 8.778215, 3.1129112, 11.177788],
        [-13.85559, 12.544218, -12.166454, 15.383192],
        [3.1641474, 16.226604, -23.874424, 19.664621],
        [26.769577, 19.824234, -12.937918, 24.020819],
        [30.30889, 23.335985, 18.258457, 28.450514],
        [1.3996639, 26.760752, 41.01269, 32.952423],
    ]
)


def test_rope_embeddings_values():
    """Equinox's values (from Hugging Face's Flax Llama), and its dtype rules: a float32
    table on a float16 input is a promotion the caller must allow."""
    x = jnp.arange(8 * 4 * 1.0).reshape(8, 4)
    rope = ea.RotaryPositionalEmbedding(4, dtype=jnp.float32)
    np.testing.assert_allclose(rope(x), ROPE_VALUES, atol=1e-5)
    with jax.numpy_dtype_promotion("standard"):
        half = rope(x.astype(jnp.float16))
        np.testing.assert_allclose(
            np.asarray(half, np.float32), np.asarray(ROPE_VALUES.astype(jnp.float16), np.float32),
            rtol=1e-3,
        )  # fmt: skip
    with pytest.raises(TypePromotionError):
        rope(x.astype(jnp.float16))
    rope16 = ea.RotaryPositionalEmbedding(4, dtype=jnp.float16)
    res = rope16(x.astype(jnp.float16))
    assert res.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(res, np.float32), ROPE_VALUES, rtol=1e-2)


def test_rope_matches_equinox():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    np.testing.assert_array_equal(
        ea.RotaryPositionalEmbedding(16)(x), eqx.nn.RotaryPositionalEmbedding(16)(x)
    )


def test_rope_with_offset():
    """Equinox's offset test, with positions: the same token at the same position is
    rotated the same way, whatever the sequence it sits in."""
    rope = eqx.filter_jit(ea.RotaryPositionalEmbedding(2))
    out1 = rope(jnp.ones((2, 2)), positions=1 + jnp.arange(2))
    out2 = rope(jnp.ones((3, 2)), positions=2 + jnp.arange(3))
    np.testing.assert_allclose(out1[1], out2[0])
    out3 = rope(jnp.ones((2, 2)), positions=1 + jnp.arange(2))
    out4 = rope(jnp.ones((3, 2)), positions=1 + jnp.arange(3))
    np.testing.assert_allclose(out3, out4[:2])

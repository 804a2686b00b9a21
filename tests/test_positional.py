import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import eqx_attention as ea


@pytest.mark.parametrize("size, theta, seq", [(8, 10000.0, 12), (32, 500.0, 40), (2, 1e6, 3)])
def test_rope_equals_equinox(getkey, size, theta, seq):
    x = jax.random.normal(getkey(), (seq, size))
    ours = ea.RotaryPositionalEmbedding(size, theta)(x)
    theirs = eqx.nn.RotaryPositionalEmbedding(size, theta)(x)
    # Same float32 formula for the frequencies, so the results agree to rounding.
    assert jnp.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_rope_positions_offset(getkey):
    rope = ea.RotaryPositionalEmbedding(16)
    x = jax.random.normal(getkey(), (20, 16))
    full = rope(x)
    part = rope(x[7:12], positions=jnp.arange(7, 12))
    assert jnp.allclose(part, full[7:12], atol=1e-6)
    jitted = jax.jit(lambda x, start: rope(x, positions=start + jnp.arange(5)))
    assert jnp.allclose(jitted(x[7:12], 7), full[7:12], atol=1e-6)


def test_rope_different_theta_differ(getkey):
    x = jax.random.normal(getkey(), (6, 8))
    a = ea.RotaryPositionalEmbedding(8, theta=10000.0)(x)
    b = ea.RotaryPositionalEmbedding(8, theta=100.0)(x)
    # Called in this order, a table keyed without theta would make b equal a.
    assert not jnp.allclose(a, b, atol=1e-3)
    assert jnp.allclose(b, _rope_reference(x, 100.0, np.arange(6)), atol=1e-5)


def _rope_reference(x, theta, positions):
    """Split-half RoPE straight from the definition, in float64."""
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    inv_freq = theta ** (-np.arange(0, d, 2) / d)
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    x1, x2 = x[:, : d // 2], x[:, d // 2 :]
    return np.concatenate(
        [x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], axis=1
    )


def test_rope_relative(getkey):
    # <rope(q, p), rope(k, s)> depends only on p - s.
    rope = ea.RotaryPositionalEmbedding(16)
    q, k = jax.random.normal(getkey(), (2, 1, 16))

    def score(p, s):
        rq = rope(q, positions=jnp.array([p]))
        rk = rope(k, positions=jnp.array([s]))
        return jnp.vdot(rq, rk)

    assert jnp.allclose(score(5, 2), score(103, 100), atol=1e-4)
    assert not jnp.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_rope_interleaved_is_permuted_split_half(getkey):
    size = 12
    x = jax.random.normal(getkey(), (9, size))
    # Interleaved pair (2i, 2i+1) is split-half pair (i, i + size/2) after this permutation.
    perm = np.concatenate([np.arange(0, size, 2), np.arange(1, size, 2)])
    inverse = np.argsort(perm)
    inter = ea.RotaryPositionalEmbedding(size, interleaved=True)(x)
    split = ea.RotaryPositionalEmbedding(size)(x[:, perm])[:, inverse]
    assert jnp.allclose(inter, split, atol=1e-6)
    assert not jnp.allclose(inter, ea.RotaryPositionalEmbedding(size)(x), atol=1e-3)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_partial(getkey, interleaved):
    x = jax.random.normal(getkey(), (7, 16))
    partial = ea.RotaryPositionalEmbedding(16, rotary_size=4, interleaved=interleaved)(x)
    small = ea.RotaryPositionalEmbedding(4, interleaved=interleaved)(x[:, :4])
    assert jnp.allclose(partial[:, :4], small, atol=1e-6)
    assert jnp.array_equal(partial[:, 4:], x[:, 4:])
    assert jnp.array_equal(ea.RotaryPositionalEmbedding(16, rotary_size=0)(x), x)


def _angles(rope, size):
    """The rotation angle of every channel pair at position 1 (split-half pairing)."""
    e = jnp.zeros((1, size)).at[0, : size // 2].set(1.0)
    out = rope(e, positions=jnp.array([1]))
    return np.arctan2(np.asarray(out[0, size // 2 :]), np.asarray(out[0, : size // 2]))


def test_rope_linear_scaling():
    size = 16
    plain = _angles(ea.RotaryPositionalEmbedding(size), size)
    scaled = _angles(ea.RotaryPositionalEmbedding(size, scaling=ea.LinearRopeScaling(4.0)), size)
    assert np.allclose(scaled, plain / 4.0, atol=1e-6)


def test_rope_llama3_scaling():
    size, theta = 64, 500000.0
    scaling = ea.Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192
    )
    got = _angles(ea.RotaryPositionalEmbedding(size, theta, scaling=scaling), size)
    # Llama 3.1's rule, one frequency at a time.
    expected = []
    for f in theta ** (-np.arange(0, size, 2) / size):
        wavelength = 2 * np.pi / f
        if wavelength < 8192 / 4.0:
            expected.append(f)
        elif wavelength > 8192 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (8192 / wavelength - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    expected = np.array(expected)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7)
    # High frequencies are kept and the lowest is divided by the factor.
    plain = _angles(ea.RotaryPositionalEmbedding(size, theta), size)
    assert got[0] == pytest.approx(plain[0], rel=1e-6)
    assert got[-1] == pytest.approx(plain[-1] / 8.0, rel=1e-5)


def test_rope_dtype_and_errors(getkey):
    x = jax.random.normal(getkey(), (5, 8)).astype(jnp.bfloat16)
    assert ea.RotaryPositionalEmbedding(8)(x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="even"):
        ea.RotaryPositionalEmbedding(7)
    with pytest.raises(ValueError, match="rotary_size"):
        ea.RotaryPositionalEmbedding(8, rotary_size=10)
    with pytest.raises(ValueError, match="embedding_size=8"):
        ea.RotaryPositionalEmbedding(8)(jnp.ones((5, 6)))
    with pytest.raises(TypeCheckError, match="positions"):
        ea.RotaryPositionalEmbedding(8)(jnp.ones((5, 8)), positions=jnp.arange(4))


def test_sinusoidal(getkey):
    size, seq = 10, 7
    pos = ea.SinusoidalPositionalEmbedding(size)
    p = np.arange(seq)[:, None]
    i = np.arange(size // 2)[None, :]
    angle = p / 10000.0 ** (2 * i / size)
    expected = np.zeros((seq, size))
    expected[:, 0::2] = np.sin(angle)
    expected[:, 1::2] = np.cos(angle)
    assert np.allclose(pos.encoding(jnp.arange(seq)), expected, atol=1e-5)
    x = jax.random.normal(getkey(), (seq, size))
    assert jnp.allclose(pos(x), x + expected, atol=1e-5)
    assert jnp.allclose(pos(x[3:], positions=jnp.arange(3, seq)), (x + expected)[3:], atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        ea.SinusoidalPositionalEmbedding(5)


@pytest.mark.parametrize(
    "options", [{}, {"interleaved": True}, {"rotary_size": 4}, {"dtype": jnp.bfloat16}]
)
def test_rope_follows_half_inputs_under_strict_promotion(getkey, options):
    """A bfloat16 input under `jax.numpy_dtype_promotion("strict")` comes back bfloat16,
    equal to the standard-promotion result (computed in the promoted dtype, then cast)."""
    rope = ea.RotaryPositionalEmbedding(8, **options)
    x = jax.random.normal(getkey(), (6, 8)).astype(jnp.bfloat16)
    want = rope(x, positions=jnp.arange(3, 9))
    with jax.numpy_dtype_promotion("strict"):
        got = rope(x, positions=jnp.arange(3, 9))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_sinusoidal_follows_half_inputs_under_strict_promotion(getkey):
    pos = ea.SinusoidalPositionalEmbedding(8)
    x = jax.random.normal(getkey(), (6, 8)).astype(jnp.bfloat16)
    want = pos(x)
    with jax.numpy_dtype_promotion("strict"):
        got = pos(x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_numpy_inputs_and_positions(getkey):
    """NumPy arrays are accepted as inputs and positions, shape-checked like jax arrays."""
    rope = ea.RotaryPositionalEmbedding(8)
    pos = ea.SinusoidalPositionalEmbedding(8)
    x = np.random.default_rng(0).standard_normal((5, 8), np.float32)
    for layer in (rope, pos):
        want = layer(jnp.asarray(x), positions=jnp.arange(2, 7))
        np.testing.assert_allclose(layer(x, positions=np.arange(2, 7)), want, atol=1e-6)
    np.testing.assert_allclose(pos.encoding(np.arange(5)), pos.encoding(jnp.arange(5)))
    with pytest.raises(TypeCheckError, match="positions"):
        rope(x, positions=np.arange(4))

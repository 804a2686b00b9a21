"""Mask helpers against jnp.tril, flax.nnx's batched helpers and dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eqx_attention as ea


# NumPy test data: eager `jax.random` calls compile anew for every shape.
@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_causal_mask_square_is_lower_triangle(n):
    mask = ea.make_causal_mask(n)
    assert mask.dtype == jnp.bool_ and mask.shape == (n, n)
    np.testing.assert_array_equal(mask, jnp.tril(jnp.ones((n, n), bool)))
    np.testing.assert_array_equal(mask, ea.make_causal_mask(n, n))
    # flax.nnx builds the same mask from a (batch-less) sequence, with a head axis.
    np.testing.assert_array_equal(mask, nnx.make_causal_mask(jnp.zeros(n))[0].astype(bool))


def test_causal_mask_is_bottom_right_aligned():
    # Two queries after three cached keys: they are positions 3 and 4.
    expected = jnp.array(
        [
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(ea.make_causal_mask(2, 5), expected)
    # More queries than keys: the first rows precede every key and see nothing.
    tall = jnp.array([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]], bool)
    np.testing.assert_array_equal(ea.make_causal_mask(5, 2), tall)


@pytest.mark.parametrize("q_len, kv_len", [(1, 6), (4, 6), (6, 6), (6, 4)])
def test_causal_mask_matches_is_causal(q_len, kv_len, rng):
    q, k, v = _normal(rng, q_len, 2, 4), _normal(rng, kv_len, 2, 4), _normal(rng, kv_len, 2, 4)

    @jax.jit
    def both(q, k, v):
        via_mask = ea.dot_product_attention(q, k, v, mask=ea.make_causal_mask(q_len, kv_len))
        return via_mask, ea.dot_product_attention(q, k, v, is_causal=True)

    via_mask, via_flag = both(q, k, v)
    np.testing.assert_allclose(via_mask, via_flag, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "query_input, key_input, pairwise_fn",
    [
        ([1, 1, 0], [1, 0, 1, 1], jnp.multiply),
        ([2, 0, 5], [0, 3], jnp.multiply),
        ([0, 0, 1, 2, 2], [0, 1, 1, 2], jnp.equal),
        ([3, 1, 2], [1, 2, 3, 4], jnp.greater_equal),
    ],
    ids=["padding", "integers", "segments", "custom"],
)
def test_make_attention_mask_matches_flax(query_input, key_input, pairwise_fn):
    query_input, key_input = jnp.array(query_input), jnp.array(key_input)
    mask = ea.make_attention_mask(query_input, key_input, pairwise_fn)
    assert mask.dtype == jnp.bool_
    assert mask.shape == (query_input.shape[0], key_input.shape[0])
    expected = nnx.make_attention_mask(query_input, key_input, pairwise_fn)
    np.testing.assert_array_equal(mask, expected[0].astype(bool))


def test_make_attention_mask_default_is_both_nonzero():
    mask = ea.make_attention_mask(jnp.array([True, False]), jnp.array([True, True, False]))
    np.testing.assert_array_equal(mask, [[True, True, False], [False, False, False]])


def test_combine_masks_none_handling():
    assert ea.combine_masks() is None
    assert ea.combine_masks(None, None) is None
    a = jnp.array([[True, False], [True, True]])
    np.testing.assert_array_equal(ea.combine_masks(a), a)
    np.testing.assert_array_equal(ea.combine_masks(None, a, None), a)


def test_combine_masks_matches_flax(rng):
    a, b, c = (jnp.asarray(rng.random(shape) < 0.7) for shape in [(3, 4, 5), (3, 4, 5), (1, 4, 5)])
    combined = ea.combine_masks(a, None, b, c)
    assert combined.dtype == jnp.bool_ and combined.shape == (3, 4, 5)
    np.testing.assert_array_equal(combined, nnx.combine_masks(a, None, b, c).astype(bool))
    np.testing.assert_array_equal(combined, a & b & c)


def test_combine_masks_broadcasts_ranks():
    # Unlike flax, masks of different ranks combine by broadcasting: a per-head mask with a
    # shared [q_seq, kv_seq] one.
    per_head = jnp.array([[[True, True]], [[False, True]]])  # [2, 1, 2]
    shared = jnp.array([[True, False]])  # [1, 2]
    np.testing.assert_array_equal(
        ea.combine_masks(per_head, shared), [[[True, False]], [[False, False]]]
    )


def test_cross_attention_mask():
    mask_q = jnp.array([True, True, False])
    mask_kv = jnp.array([1, 0, 1, 1])
    mask = ea.cross_attention_mask(mask_q, mask_kv)
    assert mask.dtype == jnp.bool_
    expected = jnp.array(
        [
            [True, False, True, True],
            [True, False, True, True],
            [False, False, False, False],
        ]
    )
    np.testing.assert_array_equal(mask, expected)


def test_cross_attention_mask_zeroes_padded_queries(rng):
    """Padded queries give zero rows; real rows match the sequence-length arguments."""
    q, k, v = _normal(rng, 5, 2, 4), _normal(rng, 7, 2, 4), _normal(rng, 7, 2, 3)

    @jax.jit
    def both(q, k, v):
        mask = ea.cross_attention_mask(jnp.arange(5) < 3, jnp.arange(7) < 6)
        out = ea.dot_product_attention(q, k, v, mask=mask)
        return out, ea.dot_product_attention(q, k, v, query_seq_length=3, key_value_seq_length=6)

    out, ref = both(q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
    assert jnp.all(out[3:] == 0)

"""`mask_mod` and `score_mod` as data: closures over learned or per-example arrays, their
gradients through the blockwise kernel, real positions only, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea

TOL = {"rtol": 2e-5, "atol": 2e-5}
HEADS, MAX_DISTANCE = 4, 6


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _alibi(slopes):
    def mod(score, head, q_pos, kv_pos):
        return score - slopes[head] * jnp.abs(q_pos - kv_pos)

    return mod


def _relative_table(table):
    """A learned `[num_heads, 2 * max_distance + 1]` bias on the clipped distance."""

    def mod(score, head, q_pos, kv_pos):
        distance = jnp.clip(kv_pos - q_pos, -MAX_DISTANCE, MAX_DISTANCE) + MAX_DISTANCE
        return score + table[head, distance]

    return mod


def _t5_buckets(table):
    """T5-style: exact small distances, logarithmic buckets beyond, one learned bias each."""

    def mod(score, head, q_pos, kv_pos):
        distance = jnp.abs(q_pos - kv_pos)
        log_bucket = 4 + jnp.floor(jnp.log2(jnp.maximum(distance, 1)) * 2).astype(jnp.int32)
        bucket = jnp.minimum(jnp.where(distance < 4, distance, log_bucket), table.shape[1] - 1)
        return score + table[head, bucket]

    return mod


MODS = {
    "alibi": (_alibi, (HEADS,)),
    "relative_table": (_relative_table, (HEADS, 2 * MAX_DISTANCE + 1)),
    "t5_buckets": (_t5_buckets, (HEADS, 12)),
}


def _grads(impl, make_mod, q, k, v, params, **options):
    def loss(q, k, v, params):
        out = ea.dot_product_attention(
            q, k, v, score_mod=make_mod(params), implementation=impl, **options
        )
        return jnp.sum(jnp.sin(out))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, params)


@pytest.mark.parametrize("name", list(MODS))
@pytest.mark.parametrize("options", [{}, {"is_causal": True, "key_value_seq_length": 19}])
def test_score_mod_parameter_gradients(name, options, small_blocks):
    make_mod, shape = MODS[name]
    rng = np.random.default_rng(0)
    q, k, v = _normal(rng, 21, HEADS, 8), _normal(rng, 21, 2, 8), _normal(rng, 21, 2, 8)
    params = 0.5 * _normal(rng, *shape) + (1.0 if name == "alibi" else 0.0)
    expected = _grads("xla", make_mod, q, k, v, params, **options)
    got = _grads("chunked", make_mod, q, k, v, params, **options)
    for name_, g, e in zip("qkvp", got, expected, strict=True):
        np.testing.assert_allclose(g, e, err_msg=name_, **TOL)
    assert np.any(np.asarray(got[3]) != 0)


def test_score_mod_parameters_per_example_under_vmap(small_blocks):
    """A batch of models, each with its own slopes: vmap over the captured array."""
    rng = np.random.default_rng(1)
    q, k, v = (_normal(rng, 3, 13, HEADS, 4) for _ in range(3))
    slopes = jnp.abs(_normal(rng, 3, HEADS))

    def loss(impl):
        def one(q, k, v, slopes):
            return ea.dot_product_attention(
                q, k, v, score_mod=_alibi(slopes), is_causal=True, implementation=impl
            )

        return lambda slopes: jnp.sum(jax.vmap(one)(q, k, v, slopes) ** 2)

    got = jax.jit(jax.grad(loss("chunked")))(slopes)
    np.testing.assert_allclose(got, jax.grad(loss("xla"))(slopes), **TOL)
    assert got.shape == (3, HEADS)


def test_mask_mod_over_per_example_documents_under_vmap_and_grad(small_blocks):
    """The per-example document ids a mask_mod closes over are batched tracers under vmap."""
    rng = np.random.default_rng(2)
    q, k, v = (_normal(rng, 2, 16, 2, 4) for _ in range(3))
    docs = jnp.array([[0] * 5 + [1] * 11, [0] * 12 + [1] * 4])

    def loss(impl, use_mod):
        def one(q, k, v, ids):
            if use_mod:
                options = dict(mask_mod=lambda qp, kp: ids[qp] == ids[kp])
            else:
                options = dict(query_segment_ids=ids, kv_segment_ids=ids)
            return ea.dot_product_attention(q, k, v, implementation=impl, **options)

        return lambda q: jnp.sum(jax.vmap(one)(q, k, v, docs) ** 2)

    got = jax.jit(jax.grad(loss("chunked", True)))(q)
    np.testing.assert_allclose(got, jax.grad(loss("xla", False))(q), **TOL)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_score_mod_sees_only_real_positions(impl, small_blocks):
    """A mod undefined past the sequence (sqrt of a negative number there) still has finite
    gradients: the kernels' block padding never reaches it."""
    rng = np.random.default_rng(3)
    q, k, v = _normal(rng, 10, 2, 4), _normal(rng, 13, 2, 4), _normal(rng, 13, 2, 4)

    def mod(score, head, q_pos, kv_pos):
        return score + jnp.sqrt(12.0 - kv_pos) - jnp.sqrt(12.0 - q_pos)

    def loss(q):
        out = ea.dot_product_attention(q, k, v, score_mod=mod, implementation=impl)
        return jnp.sum(out)

    grad = jax.grad(loss)(q)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_mask_mod_must_return_bools():
    q = jnp.zeros((4, 1, 2))
    with pytest.raises(ValueError, match="mask_mod must return a bool, got dtype int32"):
        ea.dot_product_attention(q, q, q, mask_mod=lambda qp, kp: (kp <= qp).astype(jnp.int32))


def test_score_mod_must_keep_the_shape():
    q = jnp.zeros((4, 1, 2))
    with pytest.raises(ValueError, match="score_mod must be elementwise"):
        ea.dot_product_attention(q, q, q, score_mod=lambda s, h, qp, kp: jnp.stack([s, s]))


def test_score_mod_must_return_floats():
    q = jnp.zeros((4, 1, 2))
    with pytest.raises(ValueError, match="score_mod must return a float, got dtype bool"):
        ea.dot_product_attention(q, q, q, score_mod=lambda s, h, qp, kp: s > 0)


def test_mod_that_fails_on_scalars_is_named():
    q = jnp.zeros((4, 1, 2))
    with pytest.raises(ValueError, match="mask_mod must be an elementwise function"):
        ea.dot_product_attention(q, q, q, mask_mod=lambda qp, kp: qp[:, None] >= kp)

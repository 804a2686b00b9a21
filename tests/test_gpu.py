"""Checks of the cuDNN path and of half precision on a GPU; skipped on machines without one."""

import jax
import jax.numpy as jnp
import pytest

import eqx_attention as ea

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

CASES = [
    dict(),
    dict(is_causal=True),
    dict(local_window_size=(64, 0)),
    dict(query_seq_length=100, key_value_seq_length=150),
]


def _qkv(getkey, q_seq=256, kv_seq=256, heads=8, kv_heads=2, size=64, dtype=jnp.bfloat16):
    q = jax.random.normal(getkey(), (q_seq, heads, size), dtype)
    k = jax.random.normal(getkey(), (kv_seq, kv_heads, size), dtype)
    v = jax.random.normal(getkey(), (kv_seq, kv_heads, size), dtype)
    return q, k, v


def _valid_rows(kwargs, q_seq):
    return kwargs.get("query_seq_length", q_seq)


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("implementation", ["cudnn", "chunked"])
def test_half_precision_matches_float32_reference(getkey, kwargs, implementation):
    q, k, v = _qkv(getkey)
    out = ea.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
    ref = ea.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        implementation="xla", **kwargs,
    )  # fmt: skip
    assert out.dtype == jnp.bfloat16
    rows = _valid_rows(kwargs, q.shape[0])
    assert jnp.allclose(out[:rows].astype(jnp.float32), ref[:rows], atol=3e-2, rtol=3e-2)
    assert jnp.all(out[rows:] == 0)


@pytest.mark.parametrize("kwargs", CASES)
def test_cudnn_gradients_match_xla(getkey, kwargs):
    q, k, v = _qkv(getkey)

    def grads(implementation):
        def loss(q, k, v):
            out = ea.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads("cudnn"), grads("xla"), strict=True):
        assert jnp.all(jnp.isfinite(got.astype(jnp.float32)))
        scale = jnp.max(jnp.abs(want.astype(jnp.float32)))
        err = jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
        assert err <= 5e-2 * scale


def test_cudnn_zeroes_rows_with_no_visible_key(getkey):
    q, k, v = _qkv(getkey, q_seq=128, kv_seq=128)
    mask = jnp.ones((128, 128), bool).at[5].set(False)
    out = ea.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    assert jnp.all(out[5] == 0)
    assert jnp.all(jnp.isfinite(out.astype(jnp.float32)))


def test_auto_picks_cudnn_when_supported_and_falls_back_otherwise(getkey):
    q, k, v = _qkv(getkey)

    def lowered(**kwargs):
        return jax.jit(lambda q, k, v: ea.dot_product_attention(q, k, v, **kwargs)).lower(q, k, v)

    assert "cudnn" in lowered().as_text()
    # Soft-capping is beyond cuDNN: the automatic choice falls back, an explicit one refuses.
    assert "cudnn" not in lowered(logit_softcap=30.0).as_text()
    with pytest.raises(ValueError, match="logit_softcap"):
        ea.dot_product_attention(q, k, v, logit_softcap=30.0, implementation="cudnn")

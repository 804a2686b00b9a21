"""Checks of the cuDNN path and of half precision on a GPU; skipped on machines without one."""

import equinox as eqx
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


# The Pallas kernel compiled by Triton, on every option of the spec, against the float32
# reference. Odd lengths cross the 64 x 64 tiles; 8 query heads over 2 key/value heads pack
# a group into a tile.
PALLAS_CASES = {
    "dense": dict(),
    "causal": dict(is_causal=True),
    "window": dict(local_window_size=(33, 7)),
    "lengths": dict(query_seq_length=150, key_value_seq_length=170, is_causal=True),
    "offset": dict(query_offset=40, is_causal=True),
    "softcap": dict(logit_softcap=5.0, is_causal=True),
    "dropout": dict(dropout_p=0.2, dropout_key=jax.random.key(3)),
    "documents": dict(mask_mod=ea.document_mask_mod(jnp.arange(300) // 70)),
    "alibi": dict(score_mod=lambda s, h, q, k: s - 0.1 * (h + 1) * jnp.abs(q - k)),
}


def _pallas_grads(implementation, q, k, v, extra, kwargs):
    def loss(q, k, v, extra):
        out = ea.dot_product_attention(q, k, v, implementation=implementation, **extra, **kwargs)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, extra)


def _assert_near(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = g.astype(jnp.float32), w.astype(jnp.float32)
        assert jnp.all(jnp.isfinite(g))
        assert jnp.max(jnp.abs(g - w)) <= tol * (1.0 + jnp.max(jnp.abs(w)))


@pytest.mark.parametrize("name", list(PALLAS_CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_kernel_every_option_matches_xla(getkey, name, dtype):
    kwargs = PALLAS_CASES[name]
    q, k, v = _qkv(getkey, q_seq=200, kv_seq=300, dtype=dtype)
    extra = {}
    if name == "causal":
        extra = dict(
            bias=jax.random.normal(getkey(), (1, 1, 300)),
            sinks=jax.random.normal(getkey(), (8,)),
        )
    got = _pallas_grads("pallas", q, k, v, extra, kwargs)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = _pallas_grads("xla", *f32, extra, kwargs)
    _assert_near(got, want, 5e-2 if dtype == jnp.bfloat16 else 2e-2)


def test_pallas_kernel_packed_documents_with_segment_ids_under_vmap(getkey):
    q, k, v = (jnp.stack([x, x[::-1]]) for x in _qkv(getkey, q_seq=512, kv_seq=512))
    ids = jnp.stack([jnp.arange(512) // 64, jnp.arange(512) // 200])

    def run(implementation):
        def one(q, k, v, ids):
            return ea.dot_product_attention(
                q, k, v, query_segment_ids=ids, kv_segment_ids=ids, is_causal=True,
                implementation=implementation,
            )  # fmt: skip

        return jax.vmap(one)(q, k, v, ids)

    _assert_near(run("pallas"), run("xla"), 5e-2)


def test_auto_runs_pallas_where_cudnn_cannot(getkey):
    q, k, v = _qkv(getkey)

    def lowered(**kwargs):
        return jax.jit(lambda q, k, v: ea.dot_product_attention(q, k, v, **kwargs)).lower(q, k, v)

    text = lowered(is_causal=True, logit_softcap=30.0).as_text()
    assert "triton" in text and "cudnn" not in text


# Decoding: the Pallas decode kernel, and a donated step that updates the cache in place.


def _decode_inputs(getkey, batch=4, q_seq=1, slots=4096, heads=32, kv_heads=8, size=128):
    q = jax.random.normal(getkey(), (batch, q_seq, heads, size), jnp.bfloat16)
    k = jax.random.normal(getkey(), (batch, slots, kv_heads, size), jnp.bfloat16)
    v = jax.random.normal(getkey(), (batch, slots, kv_heads, size), jnp.bfloat16)
    return q, k, v


@pytest.mark.parametrize("option", ["cache", "window", "sinks_softcap", "ring"])
@pytest.mark.parametrize("q_seq", [1, 8])
def test_pallas_decode_matches_xla_in_bfloat16(getkey, option, q_seq):
    """The split-K decode kernel against the reference, per example fills from 100 slots
    to the whole buffer, with the group of 4 query heads packed in one tile."""
    q, k, v = _decode_inputs(getkey, q_seq=q_seq)
    filled = jnp.array([100, 1000, 3000, 4096])
    batched = dict(query_offset=filled - q_seq, key_value_seq_length=filled)
    shared = dict(is_causal=True)
    if option == "window":
        shared["local_window_size"] = (700, 0)
    elif option == "sinks_softcap":
        shared.update(sinks=jnp.linspace(-1.0, 1.0, 32), logit_softcap=30.0)
    elif option == "ring":
        positions = jnp.roll(jnp.arange(4096), 1000) + 5000
        batched = dict(query_offset=jnp.full((4,), 9096 - q_seq))
        batched["key_positions"] = jnp.broadcast_to(positions, (4, 4096))
        shared["local_window_size"] = (4000, 0)

    def run(implementation):
        def one(q, k, v, batched):
            return ea.dot_product_attention(
                q, k, v, **batched, **shared, implementation=implementation
            )

        return jax.jit(jax.vmap(one))(q, k, v, batched).astype(jnp.float32)

    got, want = run("pallas"), run("xla")
    assert jnp.all(jnp.isfinite(got))
    assert jnp.allclose(got, want, atol=2e-2, rtol=2e-2)


def test_donated_bfloat16_decoding_step_runs_in_place(getkey):
    """A bfloat16 `MultiheadAttention` decoding step over a batch of caches, jitted with the
    caches donated as the KV-cache guide shows it: it runs the Pallas decode kernel, aliases
    the cache buffers (they come back at the same addresses), and its temporaries stay under
    a quarter of the caches."""
    mha = ea.MultiheadAttention(32, 4096, num_kv_heads=8, key=getkey())
    mha = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, mha)

    def filled(key):
        cache = mha.init_cache(8192)
        keys, values = jax.random.normal(key, (2,) + cache.keys.shape, jnp.bfloat16)
        return ea.KVCache(keys, values, jnp.int32(4000))

    caches = jax.vmap(filled)(jax.random.split(getkey(), 8))
    x = jax.random.normal(getkey(), (8, 1, 4096), jnp.bfloat16)

    def step(mha, caches, x):
        return jax.vmap(lambda c, x: mha(x, cache=c))(caches, x)

    donated = eqx.filter_jit(lambda inputs, caches: step(inputs[0], caches, inputs[1]),
                             donate="all-except-first")  # fmt: skip
    _, caches = donated((mha, x), caches)
    addresses = caches.keys.unsafe_buffer_pointer(), caches.values.unsafe_buffer_pointer()
    _, new = donated((mha, x), caches)
    assert (new.keys.unsafe_buffer_pointer(), new.values.unsafe_buffer_pointer()) == addresses
    assert new.length.tolist() == [4002] * 8

    params, static = eqx.partition(mha, eqx.is_array)

    def raw(params, caches, x):
        return step(eqx.combine(params, static), caches, x)

    lowered = jax.jit(raw, donate_argnums=1).lower(params, new, x)
    assert "xla.gpu.triton" in lowered.as_text()
    compiled = lowered.compile()
    assert "input_output_alias" in compiled.as_text()
    memory = compiled.memory_analysis()
    cache_bytes = new.keys.nbytes + new.values.nbytes
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < cache_bytes // 4

"""The split-K Pallas decode kernel, in Pallas interpret mode, against the `"xla"` reference:
per-example fills and offsets, every option at inference, GQA packing, ring buffers, the
merge of splits, gradients, and its lowering through Triton."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqx_attention as ea
from eqx_attention._kernels import _pallas, _pallas_decode

TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
SIZE = 16


@pytest.fixture(autouse=True)
def small_splits(monkeypatch):
    """16-key blocks dealt to 3 splits (with two key/value heads), so that a buffer of
    100 slots spans seven blocks, a split walks several, and the last one is shifted."""
    monkeypatch.setattr(_pallas_decode, "BLOCK_K", 16)
    monkeypatch.setattr(_pallas_decode, "MIN_BLOCKS_PER_SPLIT", 1)
    monkeypatch.setattr(_pallas_decode, "NUM_SMS", 6)


def _inputs(key, q_seq, kv_seq, heads=4, kv_heads=2, batch=2, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (batch, q_seq, heads, SIZE), dtype),
        jax.random.normal(kk, (batch, kv_seq, kv_heads, SIZE), dtype),
        jax.random.normal(kv, (batch, kv_seq, kv_heads, SIZE), dtype),
    )


def _options(name, kv_seq, heads, key):
    """Per-example keyword arguments (batched arrays) and shared ones, for one option."""
    # One example half full, the other filled to the last slot.
    offsets, filled = jnp.array([40, kv_seq - 6]), jnp.array([45, kv_seq])
    cache = dict(query_offset=offsets, key_value_seq_length=filled)
    slopes = jnp.linspace(0.5, 0.05, heads)
    doc = jnp.repeat(jnp.arange(kv_seq // 10 + 1), 10)[:kv_seq]
    ring = jnp.stack([jax.random.permutation(key, kv_seq) - 7, jnp.arange(kv_seq)])
    batched, shared = {
        "cache": (cache, {}),
        "window": (cache, dict(local_window_size=(20, 0))),
        "sinks_softcap": (cache, dict(sinks=jnp.linspace(-1.0, 1.0, heads), logit_softcap=3.0)),
        "alibi": (
            cache,
            dict(score_mod=lambda s, h, q, k: s - slopes[h] * jnp.abs(q - k).astype(s.dtype)),
        ),
        # A captured array: documents of 10 positions.
        "mask_mod": (cache, dict(mask_mod=lambda q, k: doc[q % kv_seq] >= doc[k])),
        "bias_mask": (
            dict(bias=jax.random.normal(key, (2, heads, 1, kv_seq)), **cache),
            dict(mask=jnp.arange(kv_seq) % 5 != 2),
        ),
        "dropout": (dict(dropout_key=jax.random.split(key, 2), **cache), dict(dropout_p=0.3)),
        # A ring buffer's slots: positions in no order, negative ones empty.
        "key_positions": (
            dict(query_offset=jnp.array([60, 95]), key_positions=ring),
            dict(local_window_size=(30, 0)),
        ),
    }[name]
    return batched, dict(is_causal=True, **shared)


def _both(q, k, v, batched, shared):
    def attend(q, k, v, batched, implementation):
        return ea.dot_product_attention(q, k, v, **batched, **shared, implementation=implementation)

    run = jax.vmap(attend, in_axes=(0, 0, 0, 0, None))
    return run(q, k, v, batched, "pallas"), run(q, k, v, batched, "xla")


OPTIONS = [
    "cache", "window", "sinks_softcap", "alibi", "mask_mod", "bias_mask", "dropout",
    "key_positions",
]  # fmt: skip


@pytest.mark.parametrize("option", OPTIONS)
def test_matches_reference_per_example(option, getkey):
    """One query per example under `vmap`, each with its own offset and filled length (or
    key positions), on 100 slots: seven 16-key blocks, the last shifted back."""
    q, k, v = _inputs(getkey(), 1, 100)
    batched, shared = _options(option, 100, 4, getkey())
    got, want = _both(q, k, v, batched, shared)
    assert jnp.allclose(got, want, **TOL)


@pytest.mark.parametrize("q_seq,heads,kv_heads", [(16, 2, 2), (1, 8, 2), (16, 16, 2), (5, 64, 2)])
def test_query_counts_and_groups(q_seq, heads, kv_heads, getkey):
    """1 to 16 queries; groups of 1, 4 and 8 (one tile of up to 128 rows) and of 32 with 5
    queries (two chunks of 16 heads, 80 rows each); causal, with a bias over heads and
    queries (packed into the tiles' rows)."""
    q, k, v = _inputs(getkey(), q_seq, 70, heads, kv_heads)
    bias = jax.random.normal(getkey(), (2, heads, q_seq, 70))
    batched = dict(query_offset=jnp.array([30, 54]), key_value_seq_length=jnp.array([46, 70]))
    got, want = _both(q, k, v, dict(bias=bias, **batched), dict(is_causal=True))
    assert jnp.allclose(got, want, **TOL)


def test_rows_that_see_no_key_output_zeros(getkey):
    """An empty cache, a window that starts past the filled slots, and a buffer shorter
    than one block; with sinks a row that sees nothing still outputs zeros."""
    q, k, v = _inputs(getkey(), 2, 12)
    batched = dict(query_offset=jnp.array([0, 11]), key_value_seq_length=jnp.array([0, 3]))
    shared = dict(is_causal=True, local_window_size=(4, 0), sinks=jnp.ones(4))
    got, want = _both(q, k, v, batched, shared)
    assert jnp.allclose(got, want, **TOL)
    assert jnp.all(got == 0)


def test_sliding_window_cache_past_wrap_around(getkey):
    """`MultiheadAttention` with a ring buffer of 24 slots, decoded for 40 tokens (the ring
    wraps around one and a half times), one token per step and per example under `vmap`,
    against the reference on the same cache."""
    mha = ea.MultiheadAttention(8, 32, num_kv_heads=2, key=getkey())
    x = jax.random.normal(getkey(), (2, 40, 32))
    window = (24, 0)

    @eqx.filter_jit
    def step(mha, cache, x, implementation):
        def one(cache, x):
            return mha(x, cache=cache, local_window_size=window, implementation=implementation)

        return jax.vmap(one)(cache, x)

    cache = jax.vmap(lambda _: mha.init_sliding_window_cache(24))(jnp.arange(2))
    for t in range(40):
        got, _ = step(mha, cache, x[:, t : t + 1], "pallas")
        want, cache = step(mha, cache, x[:, t : t + 1], "xla")
        assert jnp.allclose(got, want, **TOL)
    assert cache.length.tolist() == [40, 40]


def test_chunked_prefill_into_a_cache_runs_the_training_kernel(getkey):
    """More than 16 new tokens into a cache run the Pallas training kernel in the position
    model (an offset and a filled length), then one token runs the decode kernel."""
    mha = ea.MultiheadAttention(4, 32, num_kv_heads=2, key=getkey())
    x = jax.random.normal(getkey(), (41, 32))
    full = mha(x, is_causal=True, implementation="xla")
    cache = mha.init_cache(64)
    outs = []
    for chunk in (x[:20], x[20:40], x[40:]):
        out, cache = mha(chunk, cache=cache, implementation="pallas")
        outs.append(out)
    assert jnp.allclose(jnp.concatenate(outs), full, **TOL)


def test_gradients_and_tangents_match_reference(getkey):
    """Reverse mode (the reference's backward pass) and forward mode (the XLA decode loop)
    through the kernel, with sinks and ALiBi slopes, under `vmap`."""
    q, k, v = _inputs(getkey(), 2, 50)
    batched = dict(query_offset=jnp.array([20, 47]), key_value_seq_length=jnp.array([22, 49]))

    def loss(q, k, v, sinks, slopes, implementation):
        def mod(s, h, qp, kp):
            return s - slopes[h] * jnp.abs(qp - kp).astype(s.dtype)

        def attend(q, k, v, batched):
            return ea.dot_product_attention(
                q, k, v, **batched, is_causal=True, sinks=sinks, score_mod=mod,
                implementation=implementation,
            )  # fmt: skip

        return jnp.sum(jnp.sin(jax.vmap(attend)(q, k, v, batched)))

    args = (q, k, v, jnp.linspace(-1.0, 1.0, 4), jnp.linspace(0.1, 0.4, 4))
    argnums = tuple(range(5))
    want = jax.grad(loss, argnums)(*args, "xla")
    got = jax.grad(loss, argnums)(*args, "pallas")
    for a, b in zip(got, want, strict=True):
        assert jnp.allclose(a, b, **GRAD_TOL)
    tangents = tuple(jnp.ones_like(a) for a in args)
    _, t_got = jax.jvp(lambda *a: loss(*a, "pallas"), args, tangents)
    _, t_want = jax.jvp(lambda *a: loss(*a, "xla"), args, tangents)
    assert jnp.allclose(t_got, t_want, **GRAD_TOL)


def test_splits_follow_the_work(monkeypatch):
    """A batch of one at 32768 slots (256 blocks of 128) with 8 key/value heads: 17 splits,
    136 programs for the 132 SMs; a short buffer is not cut finer than 4 blocks a split."""
    monkeypatch.setattr(_pallas_decode, "NUM_SMS", 132)
    monkeypatch.setattr(_pallas_decode, "MIN_BLOCKS_PER_SPLIT", 4)
    assert _pallas_decode.num_splits(256, 8) == 17
    assert _pallas_decode.num_splits(8, 8) == 2
    assert _pallas_decode.num_splits(3, 8) == 1
    assert _pallas_decode.num_splits(256, 256) == 1


def test_lowers_through_triton(monkeypatch):
    """Off a GPU, the kernel lowers for CUDA as a Triton call, with every option at once:
    bfloat16, a ring buffer's positions, a window, sinks, softcap, both mods with captured
    arrays, a bias over heads and queries, a key mask and dropout."""
    monkeypatch.setattr(_pallas, "interpret", lambda: False)
    q, k, v = _inputs(jax.random.key(0), 4, 100, heads=8, dtype=jnp.bfloat16)
    slopes, doc = jnp.linspace(0.1, 1.0, 8), jnp.arange(100) // 10

    def attend(q, k, v, offset, positions):
        return ea.dot_product_attention(
            q, k, v, is_causal=True, query_offset=offset, key_positions=positions,
            local_window_size=(50, 0), sinks=jnp.zeros(8), logit_softcap=30.0,
            mask_mod=lambda a, b: doc[b] <= doc[a % 100],
            score_mod=lambda s, h, a, b: s - slopes[h] * jnp.abs(a - b).astype(s.dtype),
            bias=jnp.ones((8, 4, 100)), mask=jnp.arange(100) % 7 != 3,
            dropout_p=0.1, dropout_key=jax.random.key(1), implementation="pallas",
        )  # fmt: skip

    args = (q, k, v, jnp.array([20, 90]), jnp.tile(jnp.arange(100), (2, 1)))
    lowered = jax.jit(jax.vmap(attend)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()

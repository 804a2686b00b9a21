"""The Pallas kernel against the `"xla"` reference, in Pallas interpret mode on the CPU.

Every option of the spec, forward and gradients, on small odd shapes that cross block edges
(64 x 64 tiles), under `vmap` with plans that differ per example; and the same kernels lowered
through Triton for a GPU, which a CPU-only jaxlib can do, so a kernel that would not compile
on a GPU fails here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea
from eqx_attention._kernels import _pallas, choose_implementation

T, S, H, KH, D, DV = 70, 90, 4, 2, 24, 20


def _qkv(getkey, q_seq=T, kv_seq=S, heads=H, kv_heads=KH, size=D, vo_size=DV):
    q = jax.random.normal(getkey(), (q_seq, heads, size))
    k = jax.random.normal(getkey(), (kv_seq, kv_heads, size))
    v = jax.random.normal(getkey(), (kv_seq, kv_heads, vo_size))
    return q, k, v


def _ids(lengths, n):
    return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[:n], jnp.int32)


DOCS = np.repeat(np.arange(4), 25)
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)

# name -> (array arguments, which of them are differentiated, other arguments)
CASES = {
    "dense": ({}, dict()),
    "causal": ({}, dict(is_causal=True)),
    "window": ({}, dict(local_window_size=(7, 3), scale=0.3)),
    "lengths": ({}, dict(query_seq_length=40, key_value_seq_length=60, is_causal=True)),
    "segments": (
        {},
        dict(query_segment_ids=_ids([24, 30, 16], T), kv_segment_ids=_ids([30, 30, 30], S)),
    ),
    "causal_segments": (
        {},
        dict(
            is_causal=True,
            query_segment_ids=_ids([24, 30, 16], T),
            kv_segment_ids=_ids([44, 30, 16], S),
        ),
    ),
    "key_positions_offset": (
        {},
        dict(
            key_positions=jnp.where(jnp.arange(S) < 80, jnp.arange(S)[::-1], -1),
            is_causal=True,
            query_offset=40,
        ),
    ),
    "mask_bias_heads": ({"mask": (H, T, S), "bias": (H, T, S)}, dict()),
    "mask_bias_keys": ({"mask": (S,), "bias": (1, 1, S)}, dict(is_causal=True)),
    "mask_bias_queries": ({"mask": (1, T, 1), "bias": (T, 1)}, dict()),
    "softcap_sinks": ({"sinks": (H,)}, dict(logit_softcap=2.0, is_causal=True)),
    "dropout": ({}, dict(dropout_p=0.3, dropout_key=jax.random.key(7))),
    "mods": (
        {},
        dict(
            mask_mod=ea.document_mask_mod(jnp.asarray(DOCS)),
            score_mod=lambda s, h, q, k: s - jnp.asarray(SLOPES)[h] * jnp.abs(q - k),
        ),
    ),
    "no_visible_key": ({}, dict(key_value_seq_length=0)),
}


def _arrays(getkey, spec):
    arrays = {}
    for name, shape in spec.items():
        if name == "mask":
            mask = jax.random.bernoulli(getkey(), 0.7, shape)
            # A full mask also hides every key from one row of each head.
            arrays[name] = mask.at[:, 3, :].set(False) if shape == (H, T, S) else mask
        else:
            arrays[name] = jax.random.normal(getkey(), shape)
    return arrays


def _grads(implementation, q, k, v, arrays, kwargs):
    floats = {n: a for n, a in arrays.items() if n != "mask"}
    fixed = {n: a for n, a in arrays.items() if n == "mask"}

    def loss(q, k, v, floats):
        out = ea.dot_product_attention(
            q, k, v, implementation=implementation, **floats, **fixed, **kwargs
        )
        return jnp.sum(jnp.sin(out)), out

    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, floats)


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_every_option_forward_and_gradients_match_xla(getkey, name):
    spec, kwargs = CASES[name]
    q, k, v = _qkv(getkey)
    arrays = _arrays(getkey, spec)
    (grads, out), (want_grads, want_out) = (
        _grads(impl, q, k, v, arrays, kwargs) for impl in ("pallas", "xla")
    )
    _close(out, want_out)
    _close(grads, want_grads)
    if name == "no_visible_key":
        assert jnp.all(out == 0) and all(jnp.all(g == 0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 1), (6, 2)])
def test_query_groups_forward_and_gradients(getkey, heads, kv_heads):
    # Groups of 1, 8 (packed two heads to a tile, in four chunks) and 3 (a group that does
    # not pack into a power-of-two tile); the other tests run groups of 2.
    q, k, v = _qkv(getkey, heads=heads, kv_heads=kv_heads)
    kwargs = dict(is_causal=True, sinks=jax.random.normal(getkey(), (heads,)))
    got = _grads("pallas", q, k, v, {}, kwargs)
    want = _grads("xla", q, k, v, {}, kwargs)
    _close(got, want)


@pytest.mark.parametrize("table_size", [64, 2 * S + T])
def test_learned_score_mod_arrays_get_deterministic_gradients(getkey, table_size):
    """ALiBi slopes and a relative-position table: their gradients are per-block partial sums
    reduced in a fixed order, equal to the reference's and bit-identical between runs. A
    table of 64 elements is differentiated inside the kernel; one of 250 (not a power of
    two) by the blockwise kernel's backward pass."""
    q, k, v = _qkv(getkey)
    slopes = jax.random.uniform(getkey(), (H,))
    table = jax.random.normal(getkey(), (table_size,))

    def loss(implementation, slopes, table):
        def score_mod(s, h, qp, kp):
            return s - slopes[h] * jnp.abs(qp - kp) + table[(qp - kp) % table_size]

        out = ea.dot_product_attention(
            q, k, v, score_mod=score_mod, is_causal=True, implementation=implementation
        )
        return jnp.sum(jnp.sin(out))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    got, again = grad("pallas", slopes, table), grad("pallas", slopes, table)
    want = grad("xla", slopes, table)
    _close(got, want, tol=5e-5)
    for x, y in zip(got, again, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_vmap_with_plans_that_differ_per_example(getkey):
    """A batch whose documents and lengths differ: each example's plan is its own."""
    batch = 3
    q, k, v = (jnp.stack([x] * batch) for x in _qkv(getkey, q_seq=S))
    q = q + jax.random.normal(getkey(), q.shape)
    ids = jnp.stack([_ids([90], S), _ids([20, 70], S), _ids([33, 33, 24], S)])
    lengths = jnp.array([90, 61, 17])

    def run(implementation):
        def one(q, k, v, ids, length):
            return ea.dot_product_attention(
                q, k, v, query_segment_ids=ids, kv_segment_ids=ids, is_causal=True,
                key_value_seq_length=length, implementation=implementation,
            )  # fmt: skip

        def loss(q, k, v):
            out = jax.vmap(one)(q, k, v, ids, lengths)
            return jnp.sum(jnp.sin(out)), out

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    _close(run("pallas"), run("xla"))


def test_forward_mode_and_second_order_match_xla(getkey):
    q, k, v = _qkv(getkey)
    dq = jax.random.normal(getkey(), q.shape)

    def f(implementation):
        def attend(q):
            out = ea.dot_product_attention(
                q, k, v, is_causal=True, logit_softcap=3.0, implementation=implementation
            )
            return jnp.sum(jnp.sin(out))

        return jax.jvp(jax.grad(attend), (q,), (dq,))

    _close(f("pallas"), f("xla"), tol=1e-4)


def test_return_residual_log_sum_exp_matches_xla(getkey):
    q, k, v = _qkv(getkey)
    kwargs = dict(is_causal=True, key_value_seq_length=50, return_residual=True)
    _, lse = ea.dot_product_attention(q, k, v, implementation="pallas", **kwargs)
    _, want = ea.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    visible = np.asarray(want) > -1e30
    np.testing.assert_allclose(np.asarray(lse)[visible], np.asarray(want)[visible], rtol=1e-5)


def test_block_plan_block_sizes_are_the_kernels_tiles(getkey):
    q, k, v = _qkv(getkey, q_seq=S)
    ids = _ids([40, 50], S)
    masking = dict(query_segment_ids=ids, kv_segment_ids=ids, is_causal=True)
    plan = ea.make_block_plan(S, S, block_size=(32, 16), **masking)
    assert plan.grid == (S, S, 32, 16)
    got = ea.dot_product_attention(q, k, v, block_plan=plan, implementation="pallas", **masking)
    want = ea.dot_product_attention(q, k, v, implementation="xla", **masking)
    _close(got, want)
    # Blocks longer than the sequence are kept: the sequence is padded to one block.
    long = ea.make_block_plan(S, S, block_size=128, **masking)
    assert long.grid == (S, S, 128, 128)
    for implementation in ("pallas", "chunked"):
        got = ea.dot_product_attention(
            q, k, v, block_plan=long, implementation=implementation, **masking
        )
        _close(got, want)
    for size in ((48, 32), (512, 64)):
        odd = ea.make_block_plan(S, S, block_size=size, **masking)
        with pytest.raises(ValueError, match="powers of two from 16 to 128"):
            ea.dot_product_attention(q, k, v, block_plan=odd, implementation="pallas", **masking)


@pytest.fixture
def triton(monkeypatch):
    """Lower the kernels through Triton, as on a GPU (only lowering: nothing runs)."""
    monkeypatch.setattr(_pallas, "interpret", lambda: False)

    def lowered(fn, *args):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        return text.count("xla.gpu.triton")

    return lowered


@pytest.mark.parametrize(
    "name",
    ["causal_segments", "mask_bias_heads", "mask_bias_keys", "softcap_sinks", "dropout", "mods"],
)
def test_forward_and_backward_lower_through_triton(getkey, triton, name):
    spec, kwargs = CASES[name]
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(getkey))
    arrays = _arrays(getkey, spec)

    def loss(q, k, v):
        out = ea.dot_product_attention(q, k, v, implementation="pallas", **arrays, **kwargs)
        return jnp.sum(out.astype(jnp.float32))

    # The forward kernel, and the two backward kernels (dk/dv, dq) with it.
    assert triton(loss, q, k, v) == 1
    assert triton(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == 3


def test_learned_tables_lower_through_triton_in_and_out_of_the_kernel(getkey, triton):
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(getkey))

    def loss(q, k, v, slopes, table):
        def score_mod(s, h, qp, kp):
            return s - slopes[h] * jnp.abs(qp - kp) + table[(qp - kp) % table.shape[0]]

        out = ea.dot_product_attention(q, k, v, score_mod=score_mod, implementation="pallas")
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 3, 4))
    slopes = jnp.ones((H,))
    # 16 elements: the kernel differentiates it; 256: the blockwise kernel does.
    assert triton(grad, q, k, v, slopes, jnp.zeros((16,))) == 3
    assert triton(grad, q, k, v, slopes, jnp.zeros((256,))) == 3


def test_automatic_rule_on_a_gpu_takes_cudnn_then_pallas(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jnp.zeros((256, 8, 64), jnp.bfloat16)
    k = jnp.zeros((256, 2, 64), jnp.bfloat16)

    def choice(dtype=jnp.bfloat16, **kwargs):
        spec, *_ = ea._functional._prepare(q, k, k, **kwargs)
        return choose_implementation(spec, dtype, None, 64, 64)

    assert choice(is_causal=True) == "cudnn"
    # A left-only window is a causal window, which cuDNN runs; one reaching right it cannot.
    assert choice(local_window_size=(64, 0)) == "cudnn"
    assert choice(local_window_size=(64, 8)) == "pallas"
    assert choice(is_causal=True, logit_softcap=30.0) == "pallas"
    ids = jnp.zeros((256,), jnp.int32)
    assert choice(query_segment_ids=ids, kv_segment_ids=ids) == "pallas"
    assert choice(dtype=jnp.float32) == "pallas"
    table = jnp.zeros((512,))
    # A learned table too large to differentiate in the kernel: the blockwise kernel.
    assert choice(score_mod=lambda s, h, q, k: s + table[q - k]) == "chunked"
    # The decode kernel differentiates through the reference: any table size will do.
    q = q[:4]
    assert choice(score_mod=lambda s, h, q, k: s + table[q - k]) == "pallas"


def test_automatic_rule_off_a_gpu_never_takes_pallas(getkey):
    q, k, v = _qkv(getkey)
    spec, *_ = ea._functional._prepare(q, k, v, logit_softcap=3.0)
    assert choose_implementation(spec, jnp.float32, None, D, DV) in ("xla", "chunked")


def test_cudnn_gets_a_left_only_window_as_a_causal_window(getkey, monkeypatch):
    """cuDNN applies a sliding window only with the causal mask: a non-causal (64, 0) window,
    which is causal, reaches it as one (it gave wrong outputs otherwise)."""
    seen = {}
    real = jax.nn.dot_product_attention

    def stand_in(*args, implementation=None, **kwargs):
        seen.update(kwargs)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(getkey, q_seq=S, size=64, vo_size=64))
    out = ea.dot_product_attention(q, k, v, local_window_size=(6, 0), implementation="cudnn")
    assert seen["is_causal"] and seen["local_window_size"] == (6, 0)
    want = ea.dot_product_attention(q, k, v, local_window_size=(6, 0), implementation="xla")
    _close(out.astype(jnp.float32), want.astype(jnp.float32), tol=2e-2)

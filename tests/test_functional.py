"""`dot_product_attention` and `dot_product_attention_weights` against references.

Two references: `jax.nn.dot_product_attention` (batched) for every option it shares with us
when `q_seq == kv_seq`, and `_oracle_probs` below, a few lines of einsum with explicit
position arithmetic, for what jax.nn lacks (bottom-right alignment with `q_seq != kv_seq`,
segment ids, soft-capping, `vo_size != qk_size`, `mask_mod`, `score_mod`).

The `impl` fixture runs every test on each CPU implementation. For `"chunked"` it shrinks
the kernel's blocks so that the small shapes used here span several query and key blocks:
partial last blocks, skipped causal/window blocks and empty query blocks all get exercised.
`test_block_unaligned_shapes` covers the real block sizes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import eqx_attention as ea
from eqx_attention import _kernels as kernels

IMPLEMENTATIONS = ("xla", "chunked")
SMALL_BLOCK_Q = 4
SMALL_BLOCK_K = 8
# float32 with "highest" matmul precision (tests/conftest.py).
FWD_TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}


def _use_small_blocks(monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_Q", SMALL_BLOCK_Q)
    monkeypatch.setattr(kernels, "BLOCK_K", SMALL_BLOCK_K)


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request, monkeypatch):
    if request.param == "chunked":
        _use_small_blocks(monkeypatch)
    return request.param


# Hypothesis re-runs the test body with the same `impl` fixture; the fixture only patches
# module constants that every example wants patched the same way.
PROPERTY_SETTINGS = settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **tol)


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


def _qkv(key, q_seq, kv_seq, num_heads, num_kv_heads, qk_size=8, vo_size=None):
    kq, kk, kv = jax.random.split(key, 3)
    vo_size = qk_size if vo_size is None else vo_size
    return (
        _normal(kq, (q_seq, num_heads, qk_size)),
        _normal(kk, (kv_seq, num_kv_heads, qk_size)),
        _normal(kv, (kv_seq, num_kv_heads, vo_size)),
    )


def _oracle_probs(
    query,
    key,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    query_seq_length=None,
    key_value_seq_length=None,
    local_window_size=None,
    query_segment_ids=None,
    kv_segment_ids=None,
    logit_softcap=None,
    mask_mod=None,
    score_mod=None,
):
    """Materialised `[num_heads, q_seq, kv_seq]` probabilities; empty rows are all zero."""
    q_seq, num_heads, qk_size = query.shape
    kv_seq, num_kv_heads, _ = key.shape
    # Query head n reads key head n // group: exactly what repeating each key head does.
    key = jnp.repeat(key, num_heads // num_kv_heads, axis=1)
    scale = 1 / math.sqrt(qk_size) if scale is None else scale
    s = jnp.einsum("tnd,snd->nts", query, key) * scale
    if bias is not None:
        s = s + bias
    # Bottom-right alignment: query row i sits at key position kv_seq - q_seq + i.
    q_pos = jnp.arange(q_seq)[:, None] + (kv_seq - q_seq)
    kv_pos = jnp.arange(kv_seq)[None, :]
    if score_mod is not None:
        s = score_mod(s, jnp.arange(num_heads)[:, None, None], q_pos, kv_pos)
    if logit_softcap is not None:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    ok = jnp.ones((num_heads, q_seq, kv_seq), bool)
    if is_causal:
        ok &= kv_pos <= q_pos
    if local_window_size is not None:
        left, right = (
            (local_window_size,) * 2 if isinstance(local_window_size, int) else local_window_size
        )
        ok &= (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)
    if query_seq_length is not None:
        ok &= jnp.arange(q_seq)[:, None] < query_seq_length
    if key_value_seq_length is not None:
        ok &= kv_pos < key_value_seq_length
    if query_segment_ids is not None:
        ok &= query_segment_ids[:, None] == kv_segment_ids[None, :]
    if mask_mod is not None:
        ok &= mask_mod(q_pos, kv_pos)
    if mask is not None:
        ok &= mask
    # A finite fill keeps the gradients of empty rows finite; `* ok` then zeroes those rows.
    return jax.nn.softmax(jnp.where(ok, s, -1e30), axis=-1) * ok


def _oracle(query, key, value, bias=None, mask=None, **options):
    probs = _oracle_probs(query, key, bias, mask, **options)
    value = jnp.repeat(value, query.shape[1] // key.shape[1], axis=1)
    return jnp.einsum("nts,snd->tnd", probs, value)


def _fwd_and_grads(fn, args, cotangent):
    """`fn(*args)` and the gradients of `sum(fn(*args) * cotangent)`, in one jitted call."""

    def run(args, cotangent):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    return jax.jit(run)(args, cotangent)


def _attention(impl, **options):
    return lambda q, k, v, bias=None, mask=None: ea.dot_product_attention(
        q, k, v, bias, mask, implementation=impl, **options
    )


def _compare_with_oracle(impl, q, k, v, bias=None, mask=None, *, key, **options):
    """Forward and gradients (w.r.t. q, k, v and bias) of `impl` against `_oracle`."""
    ours = _attention(impl, **options)
    cotangent = _normal(key, (q.shape[0], q.shape[1], v.shape[2]))
    args = (q, k, v) if bias is None else (q, k, v, bias)
    out, grads = _fwd_and_grads(lambda *a: ours(*a, mask=mask), args, cotangent)
    ref, ref_grads = _fwd_and_grads(lambda *a: _oracle(*a, mask=mask, **options), args, cotangent)
    assert out.shape == ref.shape
    _close(out, ref, FWD_TOL)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        assert g.shape == ref_g.shape
        _close(g, ref_g, GRAD_TOL)
    return out, grads


# --------------------------------------------------------------------------------------
# Agreement with jax.nn.dot_product_attention (q_seq == kv_seq, batched via vmap).

BATCH, SEQ, HEADS = 2, 13, 4


def _jax_nn_case(name, key):
    """Per-example `(num_kv_heads, bias, mask, per-example lengths, options)` of a case.

    `bias`/`mask` carry a leading batch axis; options hold everything else, in our spelling.
    """
    kb, km = jax.random.split(key)
    num_kv_heads = {"gqa": 2, "mqa": 1, "all": 2}.get(name, HEADS)
    bias_shape = {
        "bias": (HEADS, SEQ, SEQ),
        "bias_2d": (SEQ, SEQ),
        "bias_broadcast_q": (HEADS, 1, SEQ),
        "bias_broadcast_head": (1, SEQ, SEQ),
        "all": (HEADS, SEQ, SEQ),
    }.get(name)
    mask_shape = {
        "mask": (HEADS, SEQ, SEQ),
        "mask_2d": (SEQ, SEQ),
        "mask_broadcast": (HEADS, 1, SEQ),
        "all": (1, SEQ, SEQ),
    }.get(name)
    bias = None if bias_shape is None else _normal(kb, (BATCH, *bias_shape))
    mask = None
    if mask_shape is not None:
        mask = jax.random.bernoulli(km, 0.6, (BATCH, *mask_shape))
        # Keep key 0 visible so no row is empty: jax.nn gives empty rows the mean of V.
        mask = mask | (jnp.arange(SEQ) == 0)
    lengths = {}
    if name in ("lengths", "all"):
        lengths = {
            "query_seq_length": jnp.array([SEQ - 4, SEQ], jnp.int32),
            "key_value_seq_length": jnp.array([SEQ, 3], jnp.int32),
        }
    options = {
        "causal": {"is_causal": True},
        "window_int": {"local_window_size": 2},
        "window_tuple": {"local_window_size": (5, 1)},
        "causal_window": {"is_causal": True, "local_window_size": (4, 0)},
        "scale": {"scale": 0.3},
        "all": {"is_causal": True, "scale": 0.5},
    }.get(name, {})
    return num_kv_heads, bias, mask, lengths, options


def _to_jax_nn(x):
    """Per-example `[..., q_seq, kv_seq]` with a batch axis -> jax.nn's 4-D `BNTS` layout."""
    return None if x is None else x.reshape(x.shape[:1] + (1,) * (4 - x.ndim) + x.shape[1:])


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "bias",
        "bias_2d",
        "bias_broadcast_q",
        "bias_broadcast_head",
        "mask",
        "mask_2d",
        "mask_broadcast",
        "causal",
        "lengths",
        "window_int",
        "window_tuple",
        "causal_window",
        "gqa",
        "mqa",
        "scale",
        "all",
    ],
)
def test_matches_jax_nn(impl, case, getkey):
    num_kv_heads, bias, mask, lengths, options = _jax_nn_case(case, getkey())
    q, k, v = jax.vmap(lambda key: _qkv(key, SEQ, SEQ, HEADS, num_kv_heads))(
        jax.random.split(getkey(), BATCH)
    )
    q_len = lengths.get("query_seq_length")
    # jax.nn's padded query rows are not ours (it does not zero them): compare valid rows only,
    # and give the padded rows no cotangent so they do not feed jax.nn's k/v gradients.
    valid = jnp.ones((BATCH, SEQ), bool) if q_len is None else jnp.arange(SEQ) < q_len[:, None]
    cotangent = _normal(getkey(), q.shape) * valid[:, :, None, None]

    def ours(q, k, v, bias=None):
        def one(q, k, v, bias, mask, lengths):
            return ea.dot_product_attention(
                q, k, v, bias, mask, implementation=impl, **lengths, **options
            )

        return jax.vmap(one)(q, k, v, bias, mask, lengths)

    def theirs(q, k, v, bias=None):
        return jax.nn.dot_product_attention(
            q, k, v, _to_jax_nn(bias), _to_jax_nn(mask),
            scale=options.get("scale"),
            is_causal=options.get("is_causal", False),
            query_seq_lengths=q_len,
            key_value_seq_lengths=lengths.get("key_value_seq_length"),
            local_window_size=options.get("local_window_size"),
            implementation="xla",
        )  # fmt: skip

    args = (q, k, v) if bias is None else (q, k, v, bias)
    out, grads = _fwd_and_grads(ours, args, cotangent)
    ref, ref_grads = _fwd_and_grads(theirs, args, cotangent)
    _close(out[valid], ref[valid], FWD_TOL)
    assert jnp.all(out[~valid] == 0)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        assert g.shape == ref_g.shape
        _close(g, ref_g, GRAD_TOL)


# --------------------------------------------------------------------------------------
# The einsum oracle: what jax.nn does not have.


@pytest.mark.parametrize("q_seq, kv_seq", [(5, 13), (13, 5), (1, 13)])
@pytest.mark.parametrize(
    "options",
    [
        {"is_causal": True},
        {"local_window_size": (3, 1)},
        {"local_window_size": 2, "is_causal": True},
        {"is_causal": True, "key_value_seq_length": 9, "query_seq_length": 3},
    ],
    ids=["causal", "window", "causal_window", "causal_lengths"],
)
def test_bottom_right_alignment(impl, q_seq, kv_seq, options, getkey):
    q, k, v = _qkv(getkey(), q_seq, kv_seq, 4, 2)
    _compare_with_oracle(impl, q, k, v, key=getkey(), **options)


def test_bottom_right_causal_example(impl):
    """Two queries, five keys: the queries are positions 3 and 4, so see 4 and 5 keys."""
    q = jnp.zeros((2, 1, 4))
    k = jnp.zeros((5, 1, 4))
    v = jnp.arange(5.0).reshape(5, 1, 1)
    out = ea.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    _close(out[:, 0, 0], [jnp.mean(jnp.arange(4.0)), jnp.mean(jnp.arange(5.0))], FWD_TOL)


def _alibi_slopes(num_heads):
    return 2.0 ** (-8.0 * jnp.arange(1, num_heads + 1) / num_heads)


def _alibi(score, head, q_pos, kv_pos):
    return score - _alibi_slopes(4)[head] * jnp.abs(q_pos - kv_pos)


def _prefix_lm(q_pos, kv_pos):
    # Bidirectional over a 4-token prefix, causal afterwards.
    return (kv_pos <= q_pos) | (kv_pos < 4)


@pytest.mark.parametrize("q_seq, kv_seq", [(13, 13), (6, 11)])
@pytest.mark.parametrize(
    "case", ["segments", "softcap", "vo_size", "mask_mod", "score_mod", "everything"]
)
def test_options_jax_nn_lacks(impl, case, q_seq, kv_seq, getkey):
    vo_size = 5 if case in ("vo_size", "everything") else 8
    q, k, v = _qkv(getkey(), q_seq, kv_seq, 4, 2, qk_size=8, vo_size=vo_size)
    options = {}
    if case in ("segments", "everything"):
        # Packed documents, including a query segment (3) with no key: those rows are empty.
        options["query_segment_ids"] = jnp.sort(jax.random.randint(getkey(), (q_seq,), 0, 4))
        options["kv_segment_ids"] = jnp.sort(jax.random.randint(getkey(), (kv_seq,), 0, 3))
    if case in ("softcap", "everything"):
        # Scaled-up queries so the cap actually bends the logits.
        q = 5 * q
        options["logit_softcap"] = 2.0
    if case in ("mask_mod", "everything"):
        options["mask_mod"] = _prefix_lm
    if case in ("score_mod", "everything"):
        options["score_mod"] = _alibi
    bias = _normal(getkey(), (4, 1, kv_seq)) if case == "everything" else None
    _compare_with_oracle(impl, q, k, v, bias, key=getkey(), **options)


def test_alibi_score_mod_equals_dense_bias(impl, getkey):
    q, k, v = _qkv(getkey(), 9, 13, 4, 4)
    q_pos = jnp.arange(9)[:, None] + 4
    kv_pos = jnp.arange(13)[None, :]
    bias = -_alibi_slopes(4)[:, None, None] * jnp.abs(q_pos - kv_pos)
    cotangent = _normal(getkey(), q.shape)
    via_mod = _attention(impl, score_mod=_alibi, is_causal=True)
    via_bias = _attention(impl, is_causal=True)
    out, grads = _fwd_and_grads(via_mod, (q, k, v), cotangent)
    ref, ref_grads = _fwd_and_grads(lambda *a: via_bias(*a, bias), (q, k, v), cotangent)
    _close(out, ref, FWD_TOL)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        _close(g, ref_g, GRAD_TOL)


def test_softcap_bounds_logits(impl, getkey):
    """With a tiny cap every logit lies in (-cap, cap): the output is nearly the mean of V."""
    q, k, v = _qkv(getkey(), 4, 6, 2, 2)
    out = ea.dot_product_attention(100 * q, k, v, logit_softcap=1e-3, implementation=impl)
    _close(out, jnp.broadcast_to(jnp.mean(v, axis=0), out.shape), {"atol": 1e-2, "rtol": 0})


# --------------------------------------------------------------------------------------
# Real block sizes: shapes that are not multiples of them, and single-token decoding.


@pytest.mark.parametrize(
    "q_seq, kv_seq, options",
    [
        (1, 1, {}),
        (7, 7, {"is_causal": True}),
        (300, 300, {"is_causal": True}),
        (300, 700, {"is_causal": True, "key_value_seq_length": 650}),
        (700, 300, {"local_window_size": (200, 30)}),
        (1, 700, {}),
        (1, 700, {"is_causal": True, "key_value_seq_length": 513}),
        (1, 700, {"local_window_size": (100, 0)}),
    ],
)
def test_block_unaligned_shapes(q_seq, kv_seq, options, getkey):
    # The kernel's own block sizes, which these shapes straddle.
    assert q_seq % kernels.BLOCK_Q or kv_seq % kernels.BLOCK_K, "shapes should straddle blocks"
    q, k, v = _qkv(getkey(), q_seq, kv_seq, 2, 1)
    _compare_with_oracle("chunked", q, k, v, key=getkey(), **options)


def test_default_implementation_matches_xla(getkey):
    # Small problems and large ones resolve to different kernels on CPU.
    for seq in (16, 300):
        q, k, v = _qkv(getkey(), seq, seq, 2, 2)
        ref = ea.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        _close(ea.dot_product_attention(q, k, v, is_causal=True), ref, FWD_TOL)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN may run on a GPU")
def test_cudnn_raises_off_gpu(getkey):
    q, k, v = _qkv(getkey(), 8, 8, 2, 2)
    with pytest.raises(ValueError, match=r"cudnn.*GPU"):
        ea.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match=r"cudnn.*GPU"):
        ea.dot_product_attention(
            q.astype(jnp.bfloat16),
            k.astype(jnp.bfloat16),
            v.astype(jnp.bfloat16),
            implementation="cudnn",
        )


# --------------------------------------------------------------------------------------
# Rows with nothing to attend to: exactly zero, with finite and zero gradients.


@pytest.mark.parametrize(
    "case", ["mask_rows", "mask_head_row", "query_length", "kv_length_zero", "causal_tall"]
)
def test_empty_rows_are_zero_with_zero_gradients(impl, case, getkey):
    (q_seq, kv_seq), heads = ((13, 6) if case == "causal_tall" else (13, 13)), 4
    q, k, v = _qkv(getkey(), q_seq, kv_seq, heads, 2)
    bias = _normal(getkey(), (heads, q_seq, kv_seq))
    mask, options = None, {}
    empty = jnp.zeros((heads, q_seq), bool)  # [head, query] pairs that see nothing
    if case == "mask_rows":
        mask = jnp.ones((q_seq, kv_seq), bool).at[jnp.array([0, 5, 12])].set(False)
        empty = empty.at[:, jnp.array([0, 5, 12])].set(True)
    elif case == "mask_head_row":
        mask = jnp.ones((heads, q_seq, kv_seq), bool).at[3, 7].set(False)
        empty = empty.at[3, 7].set(True)
    elif case == "query_length":
        options["query_seq_length"] = 9
        empty = empty.at[:, 9:].set(True)
    elif case == "kv_length_zero":
        options["key_value_seq_length"] = 0
        empty = ~empty
    else:
        # Bottom-right causal with more queries than keys: the first 7 rows sit before key 0.
        options["is_causal"] = True
        empty = empty.at[:, : q_seq - kv_seq].set(True)
    out, grads = _compare_with_oracle(impl, q, k, v, bias, mask, key=getkey(), **options)
    dq, dk, dv, dbias = grads
    rows = jnp.transpose(empty)  # [query, head], as in the output
    assert jnp.all(out[rows] == 0)
    assert all(jnp.all(jnp.isfinite(g)) for g in grads)
    assert jnp.all(dq[rows] == 0)
    assert jnp.all(dbias[empty] == 0)
    if case == "kv_length_zero":
        assert jnp.all(dk == 0) and jnp.all(dv == 0)


# --------------------------------------------------------------------------------------
# Half precision.


@pytest.mark.parametrize(
    "dtype, tol",
    [(jnp.bfloat16, {"atol": 2e-2, "rtol": 2e-2}), (jnp.float16, {"atol": 2e-3, "rtol": 2e-3})],
)
def test_half_precision(impl, dtype, tol, getkey):
    q, k, v = (x.astype(dtype) for x in _qkv(getkey(), 11, 13, 4, 2))
    bias = _normal(getkey(), (4, 11, 13))
    options = {"is_causal": True, "key_value_seq_length": 12}
    cotangent = _normal(getkey(), q.shape).astype(dtype)
    ours = _attention(impl, **options)
    out, grads = _fwd_and_grads(ours, (q, k, v, bias), cotangent)
    assert out.dtype == dtype
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, jnp.float32]
    # The float32 result on the same (exactly representable) inputs.
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    ref, ref_grads = _fwd_and_grads(ours, (*f32, bias), cotangent.astype(jnp.float32))
    _close(out.astype(jnp.float32), ref, tol)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        _close(g.astype(jnp.float32), ref_g, tol)


def test_half_precision_value_dtype_decides_output(impl, getkey):
    q, k, v = _qkv(getkey(), 5, 7, 2, 2)
    out = ea.dot_product_attention(q, k, v.astype(jnp.bfloat16), implementation=impl)
    assert out.dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------
# Dropout.


def _keep_mask(impl, dropout_key, dropout_p, q_seq=16, kv_seq=32, heads=2, **options):
    """Read the dropout keep-mask back through the public API.

    Zero queries make every weight 1/kv_seq, and one-hot values route weight (t, s) to
    output channel s, so `out * kv_seq * (1 - p)` is the 0/1 keep-mask `[q_seq, heads, kv_seq]`.
    """
    q = jnp.zeros((q_seq, heads, 4))
    k = jnp.zeros((kv_seq, heads, 4))
    v = jnp.broadcast_to(jnp.eye(kv_seq)[:, None, :], (kv_seq, heads, kv_seq))
    out = ea.dot_product_attention(
        q, k, v, dropout_p=dropout_p, dropout_key=dropout_key, implementation=impl, **options
    )
    return out * kv_seq * (1 - dropout_p)


def test_dropout_mask_is_binary_with_keep_fraction(impl, getkey):
    p = 0.3
    keeps = jnp.stack([_keep_mask(impl, getkey(), p) for _ in range(4)])
    _close(keeps, jnp.round(keeps), {"atol": 1e-5, "rtol": 0})
    # 4 * 16 * 2 * 32 = 4096 Bernoulli(0.7) draws: standard deviation 0.007.
    assert abs(float(jnp.mean(keeps)) - (1 - p)) < 0.03
    # The mask varies along every axis (a hash of head, query and key, not a shared row).
    keep = keeps[0]
    assert jnp.any(keep[0] != keep[1]) and jnp.any(keep[:, 0] != keep[:, 1])
    assert jnp.any(keep[..., 0] != keep[..., 1])


def test_dropout_deterministic_per_key(impl, getkey):
    q, k, v = _qkv(getkey(), 9, 11, 4, 2)
    key1, key2 = getkey(), getkey()

    def run(dropout_key):
        return ea.dot_product_attention(
            q, k, v, dropout_p=0.4, dropout_key=dropout_key, implementation=impl
        )

    assert jnp.array_equal(run(key1), run(key1))
    assert not jnp.allclose(run(key1), run(key2))
    no_dropout = ea.dot_product_attention(q, k, v, implementation=impl)
    assert not jnp.allclose(run(key1), no_dropout)
    # p = 0 ignores the key.
    _close(
        ea.dot_product_attention(q, k, v, dropout_p=0.0, dropout_key=key1, implementation=impl),
        no_dropout,
        FWD_TOL,
    )


@pytest.mark.parametrize("options", [{}, {"is_causal": True, "key_value_seq_length": 10}])
def test_dropout_same_in_every_implementation(options, getkey, monkeypatch):
    """The mask hashes (head, query, key) indices, so block sizes and kernels agree."""
    q, k, v = _qkv(getkey(), 11, 13, 4, 2)
    bias = _normal(getkey(), (4, 11, 13))
    cotangent = _normal(getkey(), q.shape)
    dropout_key = getkey()
    args = (q, k, v, bias)
    results = {}
    for name, small_blocks in [("xla", False), ("chunked", False), ("chunked", True)]:
        with monkeypatch.context() as patch:
            if small_blocks:
                _use_small_blocks(patch)
            fn = _attention(name, dropout_p=0.3, dropout_key=dropout_key, **options)
            results[name, small_blocks] = _fwd_and_grads(fn, args, cotangent)
    ref, ref_grads = results["xla", False]
    for key in [("chunked", False), ("chunked", True)]:
        out, grads = results[key]
        _close(out, ref, FWD_TOL)
        for g, ref_g in zip(grads, ref_grads, strict=True):
            _close(g, ref_g, GRAD_TOL)
    assert jnp.array_equal(
        _keep_mask("xla", dropout_key, 0.3, **options),
        _keep_mask("chunked", dropout_key, 0.3, **options),
    )


def test_dropout_is_unbiased(impl, getkey):
    q, k, v = _qkv(getkey(), 4, 8, 2, 2)
    p = 0.5
    draws = 4000

    @jax.jit
    def mean_output(keys):
        outs = jax.vmap(
            lambda key: ea.dot_product_attention(
                q, k, v, dropout_p=p, dropout_key=key, implementation=impl
            )
        )(keys)
        return jnp.mean(outs, axis=0), jnp.std(outs, axis=0)

    mean, std = mean_output(jax.random.split(getkey(), draws))
    expected = ea.dot_product_attention(q, k, v, implementation=impl)
    # Five standard errors of the mean, per element.
    assert jnp.all(jnp.abs(mean - expected) < 5 * std / math.sqrt(draws) + 1e-6)


def test_dropout_needs_probability_below_one(getkey):
    q, k, v = _qkv(getkey(), 3, 3, 1, 1)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout_p"):
            ea.dot_product_attention(q, k, v, dropout_p=p, dropout_key=getkey())


# --------------------------------------------------------------------------------------
# dot_product_attention_weights.


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True, "query_seq_length": 5},
        {"local_window_size": (2, 1), "key_value_seq_length": 9},
        {"logit_softcap": 3.0, "score_mod": _alibi, "mask_mod": _prefix_lm},
    ],
    ids=["plain", "causal_lengths", "window", "mods"],
)
def test_weights(impl, options, getkey):
    q, k, v = _qkv(getkey(), 7, 11, 4, 2)
    bias = _normal(getkey(), (1, 7, 11))
    # Row 2 of head 1 is masked out entirely.
    mask = jnp.ones((4, 7, 11), bool).at[1, 2].set(False)
    weights = ea.dot_product_attention_weights(q, k, bias, mask, **options)
    assert weights.shape == (4, 7, 11)
    _close(weights, _oracle_probs(q, k, bias, mask, **options), FWD_TOL)
    sums = jnp.sum(weights, axis=-1)
    assert jnp.all(jnp.isclose(sums, 1, atol=1e-5) | (sums == 0))
    assert sums[1, 2] == 0
    out = ea.dot_product_attention(q, k, v, bias, mask, implementation=impl, **options)
    via_weights = jnp.einsum("nts,snd->tnd", weights, jnp.repeat(v, 2, axis=1))
    _close(out, via_weights, FWD_TOL)


# --------------------------------------------------------------------------------------
# Properties.


def _draw_shapes(data):
    num_kv_heads = data.draw(st.sampled_from([1, 2]), label="num_kv_heads")
    num_heads = num_kv_heads * data.draw(st.sampled_from([1, 2]), label="group")
    q_seq = data.draw(st.integers(1, 12), label="q_seq")
    kv_seq = data.draw(st.integers(1, 12), label="kv_seq")
    return q_seq, kv_seq, num_heads, num_kv_heads


@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_hidden_key_does_not_matter(impl, data):
    """Rows that cannot see key j ignore its content, and hiding j from all changes nothing."""
    q_seq, kv_seq, num_heads, num_kv_heads = _draw_shapes(data)
    is_causal = data.draw(st.booleans(), label="is_causal")
    j = data.draw(st.integers(0, kv_seq - 1), label="j")
    keys = jax.random.split(jax.random.key(data.draw(st.integers(0, 2**16), label="seed")), 5)
    q, k, v = _qkv(keys[0], q_seq, kv_seq, num_heads, num_kv_heads)
    mask = jax.random.bernoulli(keys[1], 0.7, (num_heads, q_seq, kv_seq))
    sees_j = mask[:, :, j]
    if is_causal:
        sees_j &= jnp.arange(q_seq) + kv_seq - q_seq >= j
    blind = jnp.transpose(~sees_j)  # [query, head]

    fn = jax.jit(_attention(impl, is_causal=is_causal))
    out = fn(q, k, v, None, mask)
    k2 = k.at[j].set(_normal(keys[2], k[j].shape))
    v2 = v.at[j].set(_normal(keys[3], v[j].shape))
    tight = {"atol": 1e-6, "rtol": 1e-6}
    _close(fn(q, k2, v2, None, mask)[blind], out[blind], tight)
    _close(fn(q, k, v, None, mask.at[:, :, j].set(False))[blind], out[blind], tight)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_permuting_keys_with_values(impl, data):
    q_seq, kv_seq, num_heads, num_kv_heads = _draw_shapes(data)
    keys = jax.random.split(jax.random.key(data.draw(st.integers(0, 2**16), label="seed")), 6)
    q, k, v = _qkv(keys[0], q_seq, kv_seq, num_heads, num_kv_heads)
    bias = _normal(keys[1], (num_heads, q_seq, kv_seq))
    mask = jax.random.bernoulli(keys[2], 0.7, (q_seq, kv_seq))
    q_ids = jax.random.randint(keys[3], (q_seq,), 0, 2)
    kv_ids = jax.random.randint(keys[4], (kv_seq,), 0, 2)
    perm = jax.random.permutation(keys[5], kv_seq)

    fn = jax.jit(
        lambda k, v, bias, mask, kv_ids: ea.dot_product_attention(
            q, k, v, bias, mask, query_segment_ids=q_ids, kv_segment_ids=kv_ids,
            implementation=impl,
        )
    )  # fmt: skip
    out = fn(k, v, bias, mask, kv_ids)
    permuted = fn(k[perm], v[perm], bias[..., perm], mask[:, perm], kv_ids[perm])
    _close(permuted, out, FWD_TOL)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_vmap_equals_loop(impl, data):
    q_seq, kv_seq, num_heads, num_kv_heads = _draw_shapes(data)
    is_causal = data.draw(st.booleans(), label="is_causal")
    q_lens = data.draw(st.lists(st.integers(0, q_seq), min_size=3, max_size=3), label="q_lens")
    kv_lens = data.draw(st.lists(st.integers(0, kv_seq), min_size=3, max_size=3), label="kv_lens")
    keys = jax.random.split(jax.random.key(data.draw(st.integers(0, 2**16), label="seed")), 3)
    q, k, v = jax.vmap(lambda key: _qkv(key, q_seq, kv_seq, num_heads, num_kv_heads))(keys)
    q_lens, kv_lens = jnp.array(q_lens, jnp.int32), jnp.array(kv_lens, jnp.int32)

    def one(q, k, v, q_len, kv_len):
        return ea.dot_product_attention(
            q, k, v, is_causal=is_causal, query_seq_length=q_len,
            key_value_seq_length=kv_len, implementation=impl,
        )  # fmt: skip

    batched = jax.jit(jax.vmap(one))(q, k, v, q_lens, kv_lens)
    single = jax.jit(one)
    for b in range(3):
        _close(batched[b], single(q[b], k[b], v[b], q_lens[b], kv_lens[b]), FWD_TOL)

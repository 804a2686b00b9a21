"""`dot_product_attention` and `dot_product_attention_weights` against references.

Two references: `jax.nn.dot_product_attention` (batched) for every option it shares with us
when `q_seq == kv_seq`, and `_oracle_probs` below, a few lines of einsum with explicit
position arithmetic, for what jax.nn lacks (bottom-right alignment with `q_seq != kv_seq`,
segment ids, soft-capping, `vo_size != qk_size`, `mask_mod`, `score_mod`).

Every test runs each CPU implementation (through the `impl` fixture, or in a loop where one
reference serves both). For `"chunked"` the kernel's blocks are shrunk so that the small
shapes used here span several query and key blocks: partial last blocks, skipped
causal/window blocks and empty query blocks all get exercised. `test_block_unaligned_shapes`
covers the real block sizes.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jaxtyping import TypeCheckError

import eqx_attention as ea
from eqx_attention import _kernels as kernels

# "pallas" runs in Pallas interpret mode here, with its default tiles.
IMPLEMENTATIONS = ("xla", "chunked", "pallas")
# Coarse blocks and the finer steps the kernel takes along causal/window edges (which must
# divide them); tiny, so 13 queries or keys already make several partial blocks.
SMALL_BLOCKS = {"BLOCK_Q": 4, "BLOCK_K": 8, "FINE_Q": 2, "FINE_K": 4}
# float32 with "highest" matmul precision (tests/conftest.py).
FWD_TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}


def _use_small_blocks(monkeypatch):
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request, monkeypatch):
    if request.param == "chunked":
        _use_small_blocks(monkeypatch)
    return request.param


# Test data comes from NumPy: an eager `jax.random` call compiles anew for every shape, which
# costs about a second on this CPU.
@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _qkv(rng, q_seq, kv_seq, num_heads, num_kv_heads, qk_size=8, vo_size=None):
    vo_size = qk_size if vo_size is None else vo_size
    return (
        _normal(rng, q_seq, num_heads, qk_size),
        _normal(rng, kv_seq, num_kv_heads, qk_size),
        _normal(rng, kv_seq, num_kv_heads, vo_size),
    )


def _close(actual, expected, tol, err_msg=""):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), err_msg=err_msg, **tol)


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
    # Bottom-right alignment: query row i sits at key position kv_seq - q_seq + i.
    q_pos = jnp.arange(q_seq)[:, None] + (kv_seq - q_seq)
    kv_pos = jnp.arange(kv_seq)[None, :]
    if score_mod is not None:
        s = score_mod(s, jnp.arange(num_heads)[:, None, None], q_pos, kv_pos)
    if logit_softcap is not None:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    # The bias after the cap, as Gemma 2 masks after capping.
    if bias is not None:
        s = s + bias
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


def _compare_with_oracle(
    monkeypatch, rng, q, k, v, bias=None, mask=None, *, small_blocks=True, **options
):
    """Forward and gradients (w.r.t. q, k, v and bias) of each implementation against
    `_oracle`, which is compiled once for all of them. Returns `{impl: (out, grads)}`.

    `small_blocks=False` runs only `"chunked"`, with the kernel's real block sizes.
    """
    cotangent = _normal(rng, q.shape[0], q.shape[1], v.shape[2])
    args = (q, k, v) if bias is None else (q, k, v, bias)
    ref, ref_grads = _fwd_and_grads(lambda *a: _oracle(*a, mask=mask, **options), args, cotangent)
    results = {}
    for impl in IMPLEMENTATIONS if small_blocks else ("chunked",):
        with monkeypatch.context() as patch:
            if impl == "chunked" and small_blocks:
                _use_small_blocks(patch)
            ours = functools.partial(_attention(impl, **options), mask=mask)
            out, grads = _fwd_and_grads(ours, args, cotangent)
        assert out.shape == ref.shape
        _close(out, ref, FWD_TOL, err_msg=impl)
        for name, g, ref_g in zip("qkvb", grads, ref_grads, strict=False):
            assert g.shape == ref_g.shape
            _close(g, ref_g, GRAD_TOL, err_msg=f"{impl}: gradient w.r.t. {name}")
        results[impl] = out, grads
    return results


# --------------------------------------------------------------------------------------
# Agreement with jax.nn.dot_product_attention (q_seq == kv_seq, batched via vmap).

BATCH, SEQ, HEADS = 2, 13, 4

# Per case: num_kv_heads, per-example bias and mask shapes, sequence lengths, other options.
# Each bias/mask broadcast shape appears once, alongside some other option.
JAX_NN_CASES = {
    "plain": (HEADS, None, None, False, {}),
    "bias_mask_2d": (HEADS, (SEQ, SEQ), (SEQ, SEQ), False, {}),
    "broadcast_scale": (HEADS, (1, SEQ, SEQ), (HEADS, 1, SEQ), False, {"scale": 0.3}),
    "gqa_mask": (2, (HEADS, 1, SEQ), (HEADS, SEQ, SEQ), False, {}),
    "mqa_window_int": (1, None, None, False, {"local_window_size": 2}),
    "lengths": (HEADS, None, None, True, {}),
    "window_tuple_bias": (HEADS, (HEADS, SEQ, SEQ), None, False, {"local_window_size": (5, 1)}),
    "causal_window": (HEADS, None, None, False, {"is_causal": True, "local_window_size": (4, 0)}),
    "all": (2, (HEADS, SEQ, SEQ), (1, SEQ, SEQ), True, {"is_causal": True, "scale": 0.5}),
}


def _to_jax_nn(x):
    """Per-example `[..., q_seq, kv_seq]` with a batch axis -> jax.nn's 4-D `BNTS` layout."""
    return None if x is None else x.reshape(x.shape[:1] + (1,) * (4 - x.ndim) + x.shape[1:])


@pytest.mark.parametrize("case", list(JAX_NN_CASES))
def test_matches_jax_nn(case, rng, monkeypatch):
    # Both implementations in one test, so that the reference is compiled once.
    num_kv_heads, bias_shape, mask_shape, use_lengths, options = JAX_NN_CASES[case]
    examples = [_qkv(rng, SEQ, SEQ, HEADS, num_kv_heads) for _ in range(BATCH)]
    q, k, v = (jnp.stack(xs) for xs in zip(*examples, strict=True))
    bias = None if bias_shape is None else _normal(rng, BATCH, *bias_shape)
    mask = None
    if mask_shape is not None:
        # Key 0 stays visible so that no row is empty: jax.nn gives those the mean of V.
        mask = jnp.asarray((rng.random((BATCH, *mask_shape)) < 0.6) | (np.arange(SEQ) == 0))
    lengths = {}
    if use_lengths:
        lengths = {
            "query_seq_length": jnp.array([SEQ - 4, SEQ], jnp.int32),
            "key_value_seq_length": jnp.array([SEQ, 3], jnp.int32),
        }
    q_len = lengths.get("query_seq_length")
    # jax.nn's padded query rows are not ours (it does not zero them): compare valid rows only,
    # and give the padded rows no cotangent so they do not feed jax.nn's k/v gradients.
    valid = np.ones((BATCH, SEQ), bool)
    if q_len is not None:
        valid = np.arange(SEQ) < np.asarray(q_len)[:, None]
    cotangent = _normal(rng, *q.shape) * valid[:, :, None, None]

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
    ref, ref_grads = _fwd_and_grads(theirs, args, cotangent)
    ref = np.asarray(ref)
    for impl in IMPLEMENTATIONS:
        with monkeypatch.context() as patch:
            if impl == "chunked":
                _use_small_blocks(patch)

            def ours(q, k, v, bias=None, impl=impl):
                def one(q, k, v, bias, mask, lengths):
                    return ea.dot_product_attention(
                        q, k, v, bias, mask, implementation=impl, **lengths, **options
                    )

                return jax.vmap(one)(q, k, v, bias, mask, lengths)

            out, grads = _fwd_and_grads(ours, args, cotangent)
        out = np.asarray(out)
        _close(out[valid], ref[valid], FWD_TOL, err_msg=impl)
        assert np.all(out[~valid] == 0), impl
        for name, g, ref_g in zip("qkvb", grads, ref_grads, strict=False):
            assert g.shape == ref_g.shape
            _close(g, ref_g, GRAD_TOL, err_msg=f"{impl}: gradient w.r.t. {name}")


# --------------------------------------------------------------------------------------
# The einsum oracle: what jax.nn does not have.


CAUSAL_WINDOW_LENGTHS = {
    "is_causal": True,
    "local_window_size": 2,
    "key_value_seq_length": 9,
    "query_seq_length": 3,
}
# The same with lengths within the shapes of the tall and decode cases (a length beyond
# `q_seq` or `kv_seq` is an error): 4 of the 5 keys real; the decode step's one query real.
CAUSAL_WINDOW_LENGTHS_TALL = {**CAUSAL_WINDOW_LENGTHS, "key_value_seq_length": 4}
CAUSAL_WINDOW_LENGTHS_DECODE = {**CAUSAL_WINDOW_LENGTHS, "query_seq_length": 1}


@pytest.mark.parametrize(
    "q_seq, kv_seq, options",
    [
        (5, 13, {"is_causal": True}),
        (13, 5, {"is_causal": True}),
        (5, 13, {"local_window_size": (3, 1)}),
        (13, 5, {"local_window_size": (3, 1)}),
        (13, 5, CAUSAL_WINDOW_LENGTHS_TALL),
        (1, 13, CAUSAL_WINDOW_LENGTHS_DECODE),
    ],
    ids=["causal", "causal_tall", "window", "window_tall", "all_tall", "all_decode"],
)
def test_bottom_right_alignment(q_seq, kv_seq, options, rng, monkeypatch):
    q, k, v = _qkv(rng, q_seq, kv_seq, 4, 2)
    _compare_with_oracle(monkeypatch, rng, q, k, v, **options)


def test_bottom_right_causal_example(impl):
    """Two queries, five keys: the queries are positions 3 and 4, so see 4 and 5 keys."""
    q = jnp.zeros((2, 1, 4))
    k = jnp.zeros((5, 1, 4))
    v = jnp.arange(5.0).reshape(5, 1, 1)
    out = jax.jit(_attention(impl, is_causal=True))(q, k, v)
    _close(out[:, 0, 0], [np.mean(np.arange(4.0)), np.mean(np.arange(5.0))], FWD_TOL)


def _alibi_slopes(num_heads):
    return 2.0 ** (-8.0 * jnp.arange(1, num_heads + 1) / num_heads)


def _alibi(score, head, q_pos, kv_pos):
    return score - _alibi_slopes(4)[head] * jnp.abs(q_pos - kv_pos)


def _prefix_lm(q_pos, kv_pos):
    # Bidirectional over a 4-token prefix, causal afterwards.
    return (kv_pos <= q_pos) | (kv_pos < 4)


@pytest.mark.parametrize(
    "case", ["segments_vo_size", "softcap", "mask_mod", "score_mod", "everything"]
)
def test_options_jax_nn_lacks(case, rng, monkeypatch):
    q_seq, kv_seq = 9, 13
    vo_size = 5 if case in ("segments_vo_size", "everything") else 8
    q, k, v = _qkv(rng, q_seq, kv_seq, 4, 2, qk_size=8, vo_size=vo_size)
    options = {}
    if case in ("segments_vo_size", "everything"):
        # Packed documents, including a query segment (3) with no key: those rows are empty.
        q_ids, kv_ids = [0, 0, 1, 1, 1, 2, 2, 3, 3], [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
        options["query_segment_ids"] = jnp.array(q_ids, jnp.int32)
        options["kv_segment_ids"] = jnp.array(kv_ids, jnp.int32)
    if case in ("softcap", "everything"):
        # Scaled-up queries so the cap actually bends the logits.
        q = 5 * q
        options["logit_softcap"] = 2.0
    if case in ("mask_mod", "everything"):
        options["mask_mod"] = _prefix_lm
    if case in ("score_mod", "everything"):
        options["score_mod"] = _alibi
    bias = _normal(rng, 4, 1, kv_seq) if case == "everything" else None
    _compare_with_oracle(monkeypatch, rng, q, k, v, bias, **options)


def test_alibi_score_mod_equals_dense_bias(impl, rng):
    q, k, v = _qkv(rng, 9, 13, 4, 4)
    q_pos = jnp.arange(9)[:, None] + 4
    kv_pos = jnp.arange(13)[None, :]
    bias = -_alibi_slopes(4)[:, None, None] * jnp.abs(q_pos - kv_pos)
    cotangent = _normal(rng, *q.shape)
    via_mod = _attention(impl, score_mod=_alibi, is_causal=True)
    via_bias = _attention(impl, is_causal=True)
    out, grads = _fwd_and_grads(via_mod, (q, k, v), cotangent)
    ref, ref_grads = _fwd_and_grads(lambda *a: via_bias(*a, bias), (q, k, v), cotangent)
    _close(out, ref, FWD_TOL)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        _close(g, ref_g, GRAD_TOL)


def test_softcap_bounds_logits(impl, rng):
    """With a tiny cap every logit lies in (-cap, cap): the output is nearly the mean of V."""
    q, k, v = _qkv(rng, 4, 6, 2, 2)
    out = jax.jit(_attention(impl, logit_softcap=1e-3))(100 * q, k, v)
    _close(out, jnp.broadcast_to(jnp.mean(v, axis=0), out.shape), {"atol": 1e-2, "rtol": 0})


@pytest.mark.parametrize("hidden", [-jnp.inf, -1e9])
def test_softcap_keeps_additive_masks(impl, hidden, rng):
    """The bias comes after the cap: a bias that hides a key keeps hiding it."""
    q, k, v = _qkv(rng, 5, 7, 2, 2)
    keep = jnp.arange(7) % 3 != 1
    bias = jnp.where(keep, 0.0, hidden)[None, :]
    capped = jax.jit(_attention(impl, logit_softcap=2.0))(q, k, v, bias)
    masked = jax.jit(_attention(impl, logit_softcap=2.0))(q, k, v, mask=keep[None, :])
    _close(capped, masked, FWD_TOL)
    weights = ea.dot_product_attention_weights(q, k, bias, logit_softcap=2.0)
    assert np.all(np.asarray(weights)[:, :, ~np.asarray(keep)] == 0)


# --------------------------------------------------------------------------------------
# Real block sizes: shapes that are not multiples of them, and single-token decoding.


@pytest.mark.parametrize(
    "q_seq, kv_seq, options",
    [
        (7, 7, {"is_causal": True}),
        (300, 700, {"is_causal": True, "key_value_seq_length": 650}),
        (700, 300, {"local_window_size": (200, 30)}),
        (1, 700, {"is_causal": True, "key_value_seq_length": 513}),
        (1, 700, {"local_window_size": (100, 0)}),
    ],
)
def test_block_unaligned_shapes(q_seq, kv_seq, options, rng, monkeypatch):
    # The kernel's own block sizes, which these shapes straddle.
    assert q_seq % kernels.BLOCK_Q or kv_seq % kernels.BLOCK_K, "shapes should straddle blocks"
    q, k, v = _qkv(rng, q_seq, kv_seq, 2, 1)
    _compare_with_oracle(monkeypatch, rng, q, k, v, small_blocks=False, **options)


@pytest.mark.parametrize("seq", [16, 300])
def test_default_implementation_matches_xla(seq, rng):
    # Small problems and large ones resolve to different kernels on CPU.
    q, k, v = _qkv(rng, seq, seq, 2, 2)
    ref = jax.jit(_attention("xla", is_causal=True))(q, k, v)
    _close(jax.jit(_attention(None, is_causal=True))(q, k, v), ref, FWD_TOL)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN may run on a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cudnn_raises_off_gpu(dtype, rng):
    q, k, v = (x.astype(dtype) for x in _qkv(rng, 8, 8, 2, 2))
    with pytest.raises(ValueError, match=r"implementation='cudnn' is unavailable: .*GPU"):
        ea.dot_product_attention(q, k, v, implementation="cudnn")


@pytest.fixture
def cudnn_stand_in(monkeypatch):
    """The cuDNN path's own work (a batch axis, lengths, zeroed rows) on CPU, with jax.nn's
    XLA implementation standing in for cuDNN: it gives a fully masked row the mean of the
    values, which the path must turn into zeros. Returns the implementations requested."""
    if jax.default_backend() == "gpu":
        pytest.skip("tests/test_gpu.py runs the real one")
    real, calls = jax.nn.dot_product_attention, []

    def stand_in(*args, implementation, **kwargs):
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    monkeypatch.setattr(kernels, "cudnn_unsupported", lambda *args: None)
    return calls


def test_cudnn_path_zeroes_empty_and_padded_rows(rng, cudnn_stand_in):
    q, k, v = _qkv(rng, 13, 13, 4, 2)
    mask = jnp.ones((13, 13), bool).at[5].set(False)
    options = dict(mask=mask, query_seq_length=10, key_value_seq_length=11)
    out = ea.dot_product_attention(q, k, v, implementation="cudnn", **options)
    assert cudnn_stand_in == ["cudnn"]
    ref = ea.dot_product_attention(q, k, v, implementation="xla", **options)
    _close(out, ref, FWD_TOL)
    assert np.all(np.asarray(out)[[5, 10, 11, 12]] == 0)


@pytest.mark.parametrize(
    "options, empty",
    [
        # The example: keys 0..2 are real, so rows from 5 on see nothing.
        (dict(local_window_size=(1, 1), key_value_seq_length=3), [5, 6, 7]),
        (dict(local_window_size=(2, 0), is_causal=True, key_value_seq_length=2), [4, 5, 6, 7]),
        (dict(local_window_size=(1, 3), key_value_seq_length=4, query_seq_length=7), [6, 7]),
        (dict(is_causal=True, key_value_seq_length=0), list(range(8))),
    ],
    ids=["window", "causal_window", "window_both_lengths", "no_keys"],
)
def test_cudnn_path_zeroes_rows_windows_and_lengths_empty(options, empty, rng, cudnn_stand_in):
    q, k, v = _qkv(rng, 8, 8, 2, 2)
    out, lse = ea.dot_product_attention(
        q, k, v, implementation="cudnn", return_residual=True, **options
    )
    ref, ref_lse = ea.dot_product_attention(
        q, k, v, implementation="xla", return_residual=True, **options
    )
    _close(out, ref, FWD_TOL)
    _close(lse, ref_lse, FWD_TOL)
    assert np.all(np.asarray(out)[empty] == 0)


# --------------------------------------------------------------------------------------
# The residual: each row's log-sum-exp, as jax.nn's `return_residual=True`.


def test_residual_matches_jax_nn(impl, rng):
    q, k, v = _qkv(rng, 13, 13, 4, 2)
    mask = jnp.asarray(rng.random((4, 13, 13)) < 0.7)
    options = dict(mask=mask, is_causal=True, key_value_seq_length=11)
    out, lse = ea.dot_product_attention(
        q, k, v, implementation=impl, return_residual=True, **options
    )
    ref_out, ref_lse = jax.nn.dot_product_attention(
        q[None], k[None], v[None], mask=mask[None], is_causal=True,
        key_value_seq_lengths=jnp.array([11]), return_residual=True,
    )  # fmt: skip
    assert lse.shape == (13, 4) and lse.dtype == jnp.float32
    # Rows with a visible key agree; jax.nn gives empty rows a uniform softmax over its fill
    # value, we give them zeros and a fill log-sum-exp.
    seen = np.asarray(jnp.any(_oracle_probs(q, k, **options) > 0, axis=-1)).T
    _close(jnp.where(seen[..., None], out, 0), jnp.where(seen[..., None], ref_out[0], 0), FWD_TOL)
    _close(jnp.where(seen, lse, 0), jnp.where(seen, ref_lse[0], 0), FWD_TOL)


def test_residual_merges_attention_over_split_keys(impl, rng):
    """What the residual is for: attention over keys split in two parts equals the parts'
    outputs weighted by `exp(lse_part - lse_all)`, even where one part is all masked."""
    q, k, v = _qkv(rng, 13, 21, 4, 2)
    mask = jnp.ones((13, 21), bool).at[3, :11].set(False)
    whole, lse = ea.dot_product_attention(
        q, k, v, mask=mask, implementation=impl, return_residual=True
    )
    parts = [
        ea.dot_product_attention(
            q, k[cut], v[cut], mask=mask[:, cut], implementation=impl, return_residual=True
        )
        for cut in (slice(0, 11), slice(11, 21))
    ]
    lses = jnp.stack([part_lse for _, part_lse in parts])
    merged_lse = jax.nn.logsumexp(lses, axis=0)
    weights = jnp.exp(lses - merged_lse)
    merged = sum(w[..., None] * out for w, (out, _) in zip(weights, parts, strict=True))
    _close(merged_lse, lse, FWD_TOL)
    _close(merged, whole, FWD_TOL)


def test_residual_carries_no_gradient(impl, rng):
    q, k, v = _qkv(rng, 6, 6, 2, 2)
    grad = jax.grad(
        lambda q: jnp.sum(
            ea.dot_product_attention(q, k, v, implementation=impl, return_residual=True)[1]
        )
    )(q)
    assert np.all(np.asarray(grad) == 0)


# --------------------------------------------------------------------------------------
# Equinox's and jax.nn's strict settings: strict promotion, `jax.debug_infs`.


def test_no_silent_downcast_on_accelerators(impl, rng, monkeypatch):
    """On an accelerator half-precision inputs stay half (on CPU they are upcast for speed);
    a bfloat16 query must not drag float32 keys and values down to bfloat16 there."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = _qkv(rng, 9, 9, 2, 2)
    out = ea.dot_product_attention(q.astype(jnp.bfloat16), k, v, implementation=impl)
    assert out.dtype == jnp.float32
    # Only the query's own rounding to bfloat16 shows, not the keys' and values'.
    _close(out, _oracle(q.astype(jnp.bfloat16).astype(jnp.float32), k, v), FWD_TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_under_strict_promotion(dtype, impl, rng):
    q, k, v = (x.astype(dtype) for x in _qkv(rng, 9, 9, 2, 2))
    bias = _normal(rng, 2, 9, 9)

    def loss(q, k, v, bias):
        out = ea.dot_product_attention(
            q, k, v, bias, is_causal=True, dropout_p=0.1, dropout_key=jax.random.key(0),
            implementation=impl,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32))

    with jax.numpy_dtype_promotion("strict"):
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
        # Mixed inputs promote together, explicitly: a half query with float32 keys.
        out = ea.dot_product_attention(q, k.astype(jnp.float32), v, implementation=impl)
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, jnp.float32]
    assert out.dtype == jnp.float32


@pytest.mark.parametrize(
    "options",
    [
        dict(is_causal=True),
        dict(mask=np.tril(np.ones((9, 9), bool))),
        dict(local_window_size=(2, 1), key_value_seq_length=4),
        dict(mask=np.zeros((9, 9), bool)),
    ],
    ids=["causal", "mask", "window_lengths", "all_masked"],
)
def test_no_false_alarm_under_debug_infs(options, impl, rng):
    """jax issue 37422: eager calls with a mask raised FloatingPointError from the `-inf`
    fill. Forward, residual and gradients run eagerly, op by op."""
    q, k, v = _qkv(rng, 9, 9, 2, 2)
    options = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    with jax.debug_infs(True):
        out, lse = ea.dot_product_attention(
            q, k, v, implementation=impl, return_residual=True, **options
        )
        grads = jax.grad(
            lambda q, k, v: jnp.sum(
                ea.dot_product_attention(q, k, v, implementation=impl, **options)
            ),
            argnums=(0, 1, 2),
        )(q, k, v)
        weights = ea.dot_product_attention_weights(q, k, **options)
    for x in (out, lse, weights, *grads):
        assert np.all(np.isfinite(np.asarray(x)))


# --------------------------------------------------------------------------------------
# Mask shapes.


def test_key_padding_mask_of_one_axis(impl, rng):
    """A `(kv_seq,)` mask hides keys from every query, like its `(1, kv_seq)` form."""
    q, k, v = _qkv(rng, 5, 7, 2, 2)
    padding = jnp.arange(7) < 4
    out = ea.dot_product_attention(q, k, v, mask=padding, implementation=impl)
    _close(out, _oracle(q, k, v, mask=padding[None, :]), FWD_TOL)
    weights = ea.dot_product_attention_weights(q, k, mask=padding)
    assert np.all(np.asarray(weights)[..., 4:] == 0)


# --------------------------------------------------------------------------------------
# Rows with nothing to attend to: exactly zero, with finite and zero gradients.


@pytest.mark.parametrize("case", ["mask", "query_length", "kv_length_zero", "causal_tall"])
def test_empty_rows_are_zero_with_zero_gradients(case, rng, monkeypatch):
    (q_seq, kv_seq), heads = ((13, 6) if case == "causal_tall" else (13, 13)), 4
    q, k, v = _qkv(rng, q_seq, kv_seq, heads, 2)
    bias = _normal(rng, heads, q_seq, kv_seq)
    mask, options = None, {}
    empty = np.zeros((heads, q_seq), bool)  # [head, query] pairs that see nothing
    if case == "mask":
        # Rows 0, 5 and 12 are hidden in every head, row 7 in head 3 only.
        mask = np.ones((heads, q_seq, kv_seq), bool)
        mask[:, [0, 5, 12]] = False
        mask[3, 7] = False
        empty[:, [0, 5, 12]] = True
        empty[3, 7] = True
    elif case == "query_length":
        options["query_seq_length"] = 9
        empty[:, 9:] = True
    elif case == "kv_length_zero":
        options["key_value_seq_length"] = 0
        empty[:] = True
    else:
        # Bottom-right causal with more queries than keys: the first 7 rows sit before key 0.
        options["is_causal"] = True
        empty[:, : q_seq - kv_seq] = True
    mask = None if mask is None else jnp.asarray(mask)
    results = _compare_with_oracle(monkeypatch, rng, q, k, v, bias, mask, **options)
    rows = empty.T  # [query, head], as in the output
    for impl, (out, grads) in results.items():
        dq, dk, dv, dbias = (np.asarray(g) for g in grads)
        assert np.all(np.asarray(out)[rows] == 0), impl
        assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv, dbias)), impl
        assert np.all(dq[rows] == 0), impl
        assert np.all(dbias[empty] == 0), impl
        if case == "kv_length_zero":
            assert np.all(dk == 0) and np.all(dv == 0), impl


def test_xla_second_derivatives(rng):
    """The reference's softmax has its own JVP rule: Hessian-vector products still match
    jax.nn's, and rows that see nothing stay at zero to second order."""
    q, k, v = _qkv(rng, 13, 13, 4, 4)
    mask = jnp.asarray(rng.random((13, 13)) < 0.7).at[:, 0].set(True)
    direction = _normal(rng, *q.shape)

    def hvp(attend, mask):
        def loss(q):
            return jnp.sum(jnp.sin(attend(q, k, v, mask=mask, is_causal=True)))

        return jax.jvp(jax.grad(loss), (q,), (direction,))[1]

    ours = functools.partial(ea.dot_product_attention, implementation="xla")
    _close(hvp(ours, mask), hvp(jax.nn.dot_product_attention, mask[None]), GRAD_TOL)
    hidden = hvp(ours, mask.at[5].set(False))
    assert np.all(np.isfinite(hidden)) and np.all(np.asarray(hidden)[5] == 0)


def test_infinite_bias_is_an_additive_mask(impl, rng):
    """`-inf` in the bias hides a pair exactly as a `False` in the mask does, even a whole row."""
    q, k, v = _qkv(rng, 9, 13, 4, 2)
    mask = np.tril(np.ones((9, 13), bool), 4)
    mask[3] = False
    bias = jnp.where(jnp.asarray(mask), 0.0, -jnp.inf)
    cotangent = _normal(rng, *q.shape)
    ours = _attention(impl)
    out, grads = _fwd_and_grads(ours, (q, k, v, bias), cotangent)
    ref, ref_grads = _fwd_and_grads(
        lambda *a: ours(*a, mask=jnp.asarray(mask)), (q, k, v), cotangent
    )
    _close(out, ref, FWD_TOL)
    for g, ref_g in zip(grads, ref_grads, strict=False):
        _close(g, ref_g, GRAD_TOL)
    dbias = np.asarray(grads[3])
    assert np.all(np.isfinite(dbias)) and np.all(dbias[~mask] == 0)


# --------------------------------------------------------------------------------------
# Half precision.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(impl, dtype, rng):
    q, k, v = _qkv(rng, 11, 13, 4, 2)
    # Large logits (std 4): their half-precision rounding would show in the output.
    q, k, v = (4 * q).astype(dtype), k.astype(dtype), v.astype(dtype)
    bias = _normal(rng, 4, 11, 13)
    cotangent = _normal(rng, *q.shape).astype(dtype)
    options = {"is_causal": True, "key_value_seq_length": 12}
    out, grads = _fwd_and_grads(_attention(impl, **options), (q, k, v, bias), cotangent)
    assert out.dtype == dtype
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, jnp.float32]
    # Against float32 on the same (exactly representable) inputs. Computing in float32 and
    # rounding the result once costs half an ulp; one ulp also allows probabilities rounded to
    # half precision before `P @ V` (as kernels do on accelerators).
    eps = float(jnp.finfo(dtype).eps)
    tol = {"rtol": eps, "atol": eps}
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v, bias, cotangent))
    ref, ref_grads = _fwd_and_grads(lambda *a: _oracle(*a, **options), f32[:4], f32[4])
    _close(out.astype(jnp.float32), ref, tol)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        _close(g.astype(jnp.float32), ref_g, tol)


@pytest.mark.parametrize("half", ["query", "value"])
def test_inputs_promote_together(half, impl, rng):
    """As in Flax: a bfloat16 query (or value) with float32 others computes in float32,
    rather than casting the others down to the query's (or value's) dtype."""
    q, k, v = _qkv(rng, 5, 7, 2, 2)
    if half == "query":
        q = q.astype(jnp.bfloat16)
    else:
        v = v.astype(jnp.bfloat16)
    out = jax.jit(_attention(impl))(q, k, v)
    assert out.dtype == jnp.float32
    f32 = (x.astype(jnp.float32) for x in (q, k, v))
    _close(out, _attention(impl)(*f32), FWD_TOL)


# --------------------------------------------------------------------------------------
# Dropout.


def _keep_masks(base_key, impl, dropout_p, num_keys):
    """Read dropout keep-masks back through the public API, for `num_keys` dropout keys.

    Zero queries make every weight 1/kv_seq and one-hot values route weight (t, s) to output
    channel s, so `out * kv_seq * (1 - p)` is the 0/1 keep-mask, `[q_seq, heads, kv_seq]`.
    """
    q_seq, kv_seq, heads = 16, 32, 2
    q = jnp.zeros((q_seq, heads, 4))
    k = jnp.zeros((kv_seq, heads, 4))
    v = jnp.broadcast_to(jnp.eye(kv_seq)[:, None, :], (kv_seq, heads, kv_seq))

    def keep(dropout_key):
        out = ea.dot_product_attention(
            q, k, v, dropout_p=dropout_p, dropout_key=dropout_key, implementation=impl
        )
        return out * kv_seq * (1 - dropout_p)

    return jax.jit(lambda key: jax.vmap(keep)(jax.random.split(key, num_keys)))(base_key)


def test_dropout_mask_is_binary_with_keep_fraction(impl, getkey):
    p = 0.3
    keeps = _keep_masks(getkey(), impl, p, 4)
    _close(keeps, jnp.round(keeps), {"atol": 1e-5, "rtol": 0})
    # 4 * 16 * 2 * 32 = 4096 Bernoulli(0.7) draws: standard deviation 0.007.
    assert abs(float(jnp.mean(keeps)) - (1 - p)) < 0.03
    # The mask varies along every axis (a hash of head, query and key, not a shared row) and
    # with the key.
    keep = keeps[0]
    assert jnp.any(keep[0] != keep[1]) and jnp.any(keep[:, 0] != keep[:, 1])
    assert jnp.any(keep[..., 0] != keep[..., 1]) and jnp.any(keeps[0] != keeps[1])


def test_dropout_deterministic_per_key(impl, rng, getkey):
    q, k, v = _qkv(rng, 9, 11, 4, 2)
    key1, key2 = getkey(), getkey()
    fn = jax.jit(
        lambda p, dropout_key: ea.dot_product_attention(
            q, k, v, dropout_p=p, dropout_key=dropout_key, implementation=impl
        ),
        static_argnums=0,
    )
    no_dropout = jax.jit(_attention(impl))(q, k, v)
    assert jnp.array_equal(fn(0.4, key1), fn(0.4, key1))
    assert not jnp.allclose(fn(0.4, key1), fn(0.4, key2))
    assert not jnp.allclose(fn(0.4, key1), no_dropout)
    # p = 0 ignores the key.
    _close(fn(0.0, key1), no_dropout, FWD_TOL)


def test_dropout_same_in_every_implementation(rng, getkey, monkeypatch):
    """The mask hashes (head, query, key) indices, so block sizes and kernels agree."""
    q, k, v = _qkv(rng, 11, 13, 4, 2)
    bias = _normal(rng, 4, 11, 13)
    cotangent = _normal(rng, *q.shape)
    dropout_key = getkey()
    args = (q, k, v, bias)
    results = {}
    for name, small_blocks in [("xla", False), ("chunked", False), ("chunked", True)]:
        with monkeypatch.context() as patch:
            if small_blocks:
                _use_small_blocks(patch)
            fn = _attention(
                name, dropout_p=0.3, dropout_key=dropout_key, is_causal=True,
                key_value_seq_length=10,
            )  # fmt: skip
            results[name, small_blocks] = _fwd_and_grads(fn, args, cotangent)
    ref, ref_grads = results["xla", False]
    for key in [("chunked", False), ("chunked", True)]:
        out, grads = results[key]
        _close(out, ref, FWD_TOL, err_msg=str(key))
        for g, ref_g in zip(grads, ref_grads, strict=True):
            _close(g, ref_g, GRAD_TOL, err_msg=str(key))


def test_dropout_is_unbiased(impl, rng, getkey):
    q, k, v = _qkv(rng, 4, 8, 2, 2)
    p, draws = 0.5, 4000

    @jax.jit
    def moments(base_key):
        outs = jax.vmap(
            lambda key: ea.dot_product_attention(
                q, k, v, dropout_p=p, dropout_key=key, implementation=impl
            )
        )(jax.random.split(base_key, draws))
        return jnp.mean(outs, axis=0), jnp.std(outs, axis=0)

    mean, std = moments(getkey())
    expected = jax.jit(_attention(impl))(q, k, v)
    # Within five standard errors of the mean, element by element.
    assert jnp.all(jnp.abs(mean - expected) < 5 * std / math.sqrt(draws) + 1e-6)


def test_dropout_needs_probability_below_one(rng, getkey):
    q, k, v = _qkv(rng, 3, 3, 1, 1)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"dropout_p must be in \[0, 1\), got dropout_p={p}"):
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
def test_weights(impl, options, rng):
    q, k, v = _qkv(rng, 7, 11, 4, 2)
    bias = _normal(rng, 1, 7, 11)
    # Row 2 of head 1 is masked out entirely.
    mask = np.ones((4, 7, 11), bool)
    mask[1, 2] = False
    mask = jnp.asarray(mask)

    @jax.jit
    def run(q, k, v, bias, mask):
        weights = ea.dot_product_attention_weights(q, k, bias, mask, **options)
        out = ea.dot_product_attention(q, k, v, bias, mask, implementation=impl, **options)
        return weights, out, _oracle_probs(q, k, bias, mask, **options)

    weights, out, ref = run(q, k, v, bias, mask)
    assert weights.shape == (4, 7, 11)
    _close(weights, ref, FWD_TOL)
    sums = jnp.sum(weights, axis=-1)
    assert jnp.all(jnp.isclose(sums, 1, atol=1e-5) | (sums == 0))
    assert sums[1, 2] == 0
    via_weights = jnp.einsum("nts,snd->tnd", weights, jnp.repeat(v, 2, axis=1))
    _close(out, via_weights, FWD_TOL)


# --------------------------------------------------------------------------------------
# Properties. Shapes come from small sets, so examples often share a compiled function.

# Hypothesis re-runs the test body with the same `impl` fixture; the fixture only patches
# module constants that every example wants patched the same way.
PROPERTY_SETTINGS = settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _draw_problem(data):
    """Shapes, options and random q/k/v of one example."""
    num_kv_heads, group = data.draw(st.sampled_from([(1, 2), (2, 1), (2, 2)]), label="heads")
    q_seq = data.draw(st.sampled_from([1, 6, 13]), label="q_seq")
    kv_seq = data.draw(st.sampled_from([1, 5, 13]), label="kv_seq")
    is_causal = data.draw(st.booleans(), label="is_causal")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    q, k, v = _qkv(rng, q_seq, kv_seq, num_kv_heads * group, num_kv_heads)
    return q, k, v, is_causal, rng


@functools.cache
def _jitted_attention(impl, blocks, **options):
    """One jitted function per configuration (blocks included), reused across examples."""
    del blocks  # only part of the cache key: the kernel reads its block sizes when traced
    return jax.jit(_attention(impl, **options))


def _property_attention(impl, **options):
    blocks = tuple(getattr(kernels, name, None) for name in SMALL_BLOCKS)
    return _jitted_attention(impl, blocks, **options)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_hidden_key_does_not_matter(impl, data):
    """Rows that cannot see key j ignore its content, and hiding j from all changes nothing."""
    q, k, v, is_causal, rng = _draw_problem(data)
    (q_seq, num_heads, _), kv_seq = q.shape, k.shape[0]
    j = data.draw(st.integers(0, kv_seq - 1), label="j")
    mask = rng.random((num_heads, q_seq, kv_seq)) < 0.7
    sees_j = mask[:, :, j] & (np.arange(q_seq) + kv_seq - q_seq >= j if is_causal else True)
    blind = ~sees_j.T  # [query, head]

    fn = _property_attention(impl, is_causal=is_causal)
    out = fn(q, k, v, None, jnp.asarray(mask))[blind]
    k2 = k.at[j].set(_normal(rng, *k.shape[1:]))
    v2 = v.at[j].set(_normal(rng, *v.shape[1:]))
    tight = {"atol": 1e-6, "rtol": 1e-6}
    _close(fn(q, k2, v2, None, jnp.asarray(mask))[blind], out, tight)
    mask[:, :, j] = False
    _close(fn(q, k, v, None, jnp.asarray(mask))[blind], out, tight)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_permuting_keys_with_values(impl, data):
    q, k, v, _, rng = _draw_problem(data)
    (q_seq, num_heads, _), kv_seq = q.shape, k.shape[0]
    bias = _normal(rng, num_heads, q_seq, kv_seq)
    mask = jnp.asarray(rng.random((q_seq, kv_seq)) < 0.7)
    q_ids = jnp.asarray(rng.integers(0, 2, q_seq), jnp.int32)
    kv_ids = jnp.asarray(rng.integers(0, 2, kv_seq), jnp.int32)
    perm = rng.permutation(kv_seq)

    @jax.jit
    def fn(k, v, bias, mask, kv_ids):
        return ea.dot_product_attention(
            q, k, v, bias, mask, query_segment_ids=q_ids, kv_segment_ids=kv_ids,
            implementation=impl,
        )  # fmt: skip

    out = fn(k, v, bias, mask, kv_ids)
    permuted = fn(k[perm], v[perm], bias[..., perm], mask[:, perm], kv_ids[perm])
    _close(permuted, out, FWD_TOL)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_vmap_equals_loop(impl, data):
    q, k, v, is_causal, rng = _draw_problem(data)
    q_seq, kv_seq = q.shape[0], k.shape[0]
    batch = 3
    # Per-example data and lengths (a length may be 0: an all-padding example).
    q, k, v = (jnp.stack([x, -x, 2 * x]) for x in (q, k, v))
    q_lens = jnp.asarray(rng.integers(0, q_seq + 1, batch), jnp.int32)
    kv_lens = jnp.asarray(rng.integers(0, kv_seq + 1, batch), jnp.int32)

    def one(q, k, v, q_len, kv_len):
        return ea.dot_product_attention(
            q, k, v, is_causal=is_causal, query_seq_length=q_len,
            key_value_seq_length=kv_len, implementation=impl,
        )  # fmt: skip

    batched = jax.jit(jax.vmap(one))(q, k, v, q_lens, kv_lens)
    single = jax.jit(one)
    for b in range(batch):
        _close(batched[b], single(q[b], k[b], v[b], q_lens[b], kv_lens[b]), FWD_TOL)


@pytest.mark.parametrize("q_seq", [300, 4])  # the block grid, and the decode loop
def test_python_int_lengths_under_jit_vmap_and_grad(q_seq):
    """Constant lengths reach the backward pass as NumPy literals under an inner `jit`; the
    kernels rebuild their spec from them without a type error."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, q_seq, 2, 8))
    k, v = jax.random.normal(kk, (2, 300, 2, 8)), jax.random.normal(kv, (2, 300, 2, 8))

    attend = jax.jit(
        jax.vmap(
            lambda q: ea.dot_product_attention(
                q,
                k[0],
                v[0],
                key_value_seq_length=250,
                query_seq_length=3,
                query_offset=40,
                is_causal=True,
                implementation="chunked",
            )  # fmt: skip
        )
    )

    def loss(q):
        return jnp.sum(attend(q) ** 2)

    grads = jax.jit(jax.grad(loss))(q)
    expected = jax.grad(loss)(q)
    assert grads.shape == q.shape and jnp.allclose(grads, expected, atol=1e-5)
    assert jnp.abs(grads).max() > 0.1


# --------------------------------------------------------------------------------------
# Lengths out of range, and NumPy inputs.


@pytest.mark.parametrize(
    "name, value, bound",
    [
        ("key_value_seq_length", -3, 16),
        ("key_value_seq_length", 100, 16),
        ("query_seq_length", 10, 9),
        ("query_seq_length", -1, 9),
    ],
)
def test_concrete_lengths_out_of_range_raise(name, value, bound, rng):
    q, k, v = _qkv(rng, 9, 16, 2, 2)
    match = rf"{name}={value} .*\[0, {bound}\]"
    for length in (value, np.int32(value), jnp.asarray(value)):
        with pytest.raises(ValueError, match=match):
            ea.dot_product_attention(q, k, v, **{name: length})
    with pytest.raises(ValueError, match=match):
        ea.dot_product_attention_weights(q, k, **{name: value})
    with pytest.raises(ValueError, match=match):
        ea.make_block_plan(9, 16, **{name: value})
    # The bounds themselves are fine.
    ea.dot_product_attention(q, k, v, **{name: 0})
    ea.dot_product_attention(q, k, v, **{name: bound})


def test_traced_lengths_are_clipped(impl, rng):
    """Under `jit` a length cannot be checked: it is clipped to `[0, seq]`."""
    q, k, v = _qkv(rng, 9, 16, 2, 2)

    @jax.jit
    def attend(q_length, kv_length):
        return ea.dot_product_attention(
            q, k, v, query_seq_length=q_length, key_value_seq_length=kv_length,
            implementation=impl,
        )  # fmt: skip

    _close(attend(100, 100), ea.dot_product_attention(q, k, v, implementation=impl), FWD_TOL)
    np.testing.assert_array_equal(attend(9, -3), np.zeros_like(q))
    np.testing.assert_array_equal(attend(-5, 16), np.zeros_like(q))


def test_numpy_inputs(impl, rng):
    """Every array argument may be a NumPy array, as jax.nn accepts them; the shapes are
    still checked."""
    q, k, v = (np.asarray(x) for x in _qkv(rng, 9, 12, 4, 2))
    ids = np.repeat(np.arange(3), 4)
    arrays = dict(
        bias=rng.standard_normal((4, 9, 12)).astype(np.float32),
        mask=rng.random((9, 12)) < 0.8,
        query_segment_ids=ids[3:],
        kv_segment_ids=ids,
        key_positions=np.arange(12),
        sinks=np.linspace(-1, 1, 4).astype(np.float32),
    )
    as_jax = {name: jnp.asarray(x) for name, x in arrays.items()}
    options = dict(is_causal=True, query_seq_length=np.int32(8), implementation=impl)
    got = ea.dot_product_attention(q, k, v, **arrays, **options)
    want = ea.dot_product_attention(*map(jnp.asarray, (q, k, v)), **as_jax, **options)
    _close(got, want, FWD_TOL)
    weights = ea.dot_product_attention_weights(q, k, **arrays, is_causal=True)
    _close(weights, ea.dot_product_attention_weights(q, k, **as_jax, is_causal=True), FWD_TOL)
    plan_arrays = {n: arrays[n] for n in ("mask", "query_segment_ids", "kv_segment_ids")}
    ea.make_block_plan(9, 12, **plan_arrays, is_causal=True)
    with pytest.raises(TypeCheckError):
        ea.dot_product_attention(q, k[:5], v, **options)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_residual_in_the_output_dtype(dtype, impl, rng):
    """The log-sum-exp comes back in the output's dtype, as jax.nn's; an empty row's stays
    finite, also in float16, so it merges (and passes `jax.debug_infs`)."""
    q, k, v = (x.astype(dtype) for x in _qkv(rng, 5, 7, 2, 2))
    mask = jnp.ones((5, 7), bool).at[2].set(False)
    with jax.debug_infs(True):
        out, lse = ea.dot_product_attention(
            q, k, v, mask=mask, implementation=impl, return_residual=True
        )
    assert out.dtype == lse.dtype == dtype
    assert np.all(np.isfinite(np.asarray(lse, np.float32)))
    assert np.all(np.asarray(lse[2], np.float32) <= -6e4)
    _, lse32 = ea.dot_product_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), mask=mask, implementation=impl,
        return_residual=True,
    )  # fmt: skip
    seen = np.arange(5) != 2
    _close(np.asarray(lse, np.float32)[seen], lse32[seen], {"atol": 2e-2, "rtol": 1e-2})

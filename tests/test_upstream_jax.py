"""The dot-product-attention cases of jax's `tests/nn_test.py`, run on eqx_attention.

jax's tests compare `jax.nn.dot_product_attention(implementation="cudnn")` with its XLA
implementation; here our per-example function (vmapped over the batch, on each CPU
implementation) is compared with jax.nn's XLA implementation, with jax's shapes, dtypes and
tolerances. Causal and window masks are aligned alike because `q_seq == kv_seq` throughout.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea

IMPLEMENTATIONS = ("xla", "chunked")
# jax's tolerances for half-precision inputs.
TOL = {"atol": 0.01, "rtol": 0.01}
GRAD_TOL = {"atol": 0.02, "rtol": 0.02}


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, dtype)


def _ours(implementation, **options):
    """Our function on a batch: the per-example call, vmapped; lengths are per example."""

    def batched(q, k, v, bias, mask, q_lengths, kv_lengths):
        def one(q, k, v, bias, q_length, kv_length):
            return ea.dot_product_attention(
                q, k, v, bias, mask, query_seq_length=q_length,
                key_value_seq_length=kv_length, implementation=implementation, **options,
            )  # fmt: skip

        bias_axis = None if bias is None else 0
        q_axis = None if q_lengths is None else 0
        kv_axis = None if kv_lengths is None else 0
        return jax.vmap(one, in_axes=(0, 0, 0, bias_axis, q_axis, kv_axis))(
            q, k, v, bias, q_lengths, kv_lengths
        )

    return batched


def _theirs(**options):
    def batched(q, k, v, bias, mask, q_lengths, kv_lengths):
        mask4 = None if mask is None else mask[None, None]
        return jax.nn.dot_product_attention(
            q, k, v, bias, mask4, query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths, implementation="xla", **options,
        )  # fmt: skip

    return batched


def _vjp(fn, args, cotangent, argnums):
    """Output and the gradients of `args[i]` for `i` in `argnums`, jitted."""

    @jax.jit
    def run(args, cotangent):
        def partial_fn(*diff):
            full = list(args)
            for i, x in zip(argnums, diff, strict=True):
                full[i] = x
            return fn(*full)

        out, vjp = jax.vjp(partial_fn, *(args[i] for i in argnums))
        return out, vjp(cotangent)

    return run(args, cotangent)


def _close(actual, expected, tol):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tol
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("group_num", [1, 2, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dot_product_attention(dtype, group_num, implementation):
    """jax's testDotProductAttention: grouped-query attention in half precision, forward
    and gradients, against the XLA reference with the key/value heads repeated."""
    B, S, T, N, H, G = 2, 128, 128, 4, 32, group_num
    keys = jax.random.split(jax.random.key(0), 4)
    q = _normal(keys[0], (B, T, N, H), dtype)
    k = _normal(keys[1], (B, S, N // G, H), dtype)
    v = _normal(keys[2], (B, S, N // G, H), dtype)
    grad = _normal(keys[3], (B, T, N, H), dtype)
    args = (q, k, v, None, None, None, None)
    out, (dq, dk, dv) = _vjp(_ours(implementation), args, grad, (0, 1, 2))
    # The reference runs in float32: XLA:CPU has no float16 dot with float32 accumulation,
    # which jax.nn asks for.
    q32, k32, v32, grad32 = (x.astype(jnp.float32) for x in (q, k, v, grad))
    repeated = (q32, jnp.repeat(k32, G, axis=2), jnp.repeat(v32, G, axis=2))
    ref, (dq_ref, dk_ref, dv_ref) = _vjp(
        _theirs(), (*repeated, None, None, None, None), grad32, (0, 1, 2)
    )
    # The repeated heads' gradients sum into their key/value head.
    dk_ref = dk_ref.reshape(B, S, N // G, G, H).sum(axis=3)
    dv_ref = dv_ref.reshape(B, S, N // G, G, H).sum(axis=3)
    assert out.dtype == dtype
    _close(out, ref, TOL)
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        _close(got, want, TOL)


MASK_MODES = [
    ("bias",),
    ("causal",),
    ("padding",),
    ("custom",),
    ("causal", "padding"),
    ("custom", "padding"),
    ("bias", "causal"),
    ("causal", "sliding_window"),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask_mode", MASK_MODES, ids="+".join)
def test_dot_product_attention_mask(mask_mode, implementation):
    """jax's testDotProductAttentionMask: every kind of mask, alone and combined, forward
    and the gradients of q, k, v and the bias."""
    dtype = jnp.bfloat16
    B, S, T, N, H = 2, 128, 128, 4, 32
    keys = jax.random.split(jax.random.key(0), 5)
    q = _normal(keys[0], (B, T, N, H), dtype)
    k = _normal(keys[1], (B, S, N, H), dtype)
    v = _normal(keys[2], (B, S, N, H), dtype)
    grad = _normal(keys[3], (B, T, N, H), dtype)
    bias = mask = q_lengths = kv_lengths = window = None
    is_causal = "causal" in mask_mode
    if "padding" in mask_mode:
        q_lengths = jnp.array([T // 2, T // 4], jnp.int32)
        kv_lengths = jnp.array([S // 4, S // 2], jnp.int32)
    if "custom" in mask_mode:
        mask = jnp.tril(jnp.ones((T, S), bool))  # a causal mask, given as data
    if "bias" in mask_mode:
        bias = _normal(keys[4], (B, N, T, S), dtype)
    if "sliding_window" in mask_mode:
        window = (3, 2) if is_causal else (3, 0)
    options = dict(is_causal=is_causal, local_window_size=window)
    args = (q, k, v, bias, mask, q_lengths, kv_lengths)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    out, grads = _vjp(_ours(implementation, **options), args, grad, argnums)
    ref, ref_grads = _vjp(_theirs(**options), args, grad, argnums)
    _close(out, ref, TOL)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want, GRAD_TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch_size", [1, 16])
def test_dot_product_attention_bias_gradient(batch_size, implementation):
    """jax's testDotProductAttentionBiasGradient: self-attention with a per-example bias
    and an all-true key-padding mask (jax's `(1, 1, S)`, our `(S,)`); the bias gradient
    agrees for every batch size (cuDNN only supports batch 1 there)."""
    dtype = jnp.bfloat16
    B, S, N, H = batch_size, 128, 4, 32
    keys = jax.random.split(jax.random.key(0), 2)
    x = _normal(keys[0], (B, S, N, H), dtype)
    bias = _normal(keys[1], (B, N, S, S), dtype)
    padding = jnp.ones((S,), bool)

    def ours(x, bias):
        attend = functools.partial(ea.dot_product_attention, implementation=implementation)
        return jax.vmap(lambda x, b: attend(x, x, x, b, padding))(x, bias)

    def theirs(x, bias):
        return jax.nn.dot_product_attention(
            x, x, x, bias, padding[None, None], implementation="xla"
        )

    out, (dx, dbias) = _vjp(ours, (x, bias), x, (0, 1))
    ref, (dx_ref, dbias_ref) = _vjp(theirs, (x, bias), x, (0, 1))
    _close(out, ref, TOL)
    # jax's tolerance for the bias gradient in bfloat16.
    _close(dbias, dbias_ref, {"atol": 0.1, "rtol": 0.1})
    _close(dx, dx_ref, {"atol": 0.1, "rtol": 0.1})


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_floating_point_error_with_debug_infs(implementation):
    """jax issue 37422 (jax's regression test): in 64-bit mode, a masked call under
    `jax.debug_infs(True)` must not raise FloatingPointError."""
    T, S, K, N, H = 5, 7, 3, 6, 11
    mask = jnp.arange(S) <= S // 2
    with jax.enable_x64(True), jax.debug_infs(True):
        zeros = functools.partial(np.zeros, dtype=np.float64)
        out = ea.dot_product_attention(
            jnp.asarray(zeros((T, N, H))), jnp.asarray(zeros((S, K, H))),
            jnp.asarray(zeros((S, K, H))), mask=mask, implementation=implementation,
        )  # fmt: skip
        out.block_until_ready()
    assert out.dtype == jnp.float64
    assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_return_residual(implementation, dtype):
    """`return_residual=True` as jax.nn's: the log-sum-exp per query row and head,
    `(T, N)` per example (jax.nn's `BTN` without the batch axis), in the output's dtype."""
    B, T, N, H = 2, 16, 4, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (_normal(key, (B, T, N, H), dtype) for key in keys)
    ref, ref_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    out, lse = jax.vmap(
        lambda q, k, v: ea.dot_product_attention(
            q, k, v, is_causal=True, implementation=implementation, return_residual=True
        )
    )(q, k, v)
    assert lse.shape == ref_lse.shape == (B, T, N)
    assert out.dtype == lse.dtype == ref_lse.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == jnp.float32 else TOL
    _close(out, ref, tol)
    _close(lse, ref_lse, tol)

"""Every derivative through the blockwise and decode kernels: forward mode, Hessian-vector
products and grad of grad, against the materialising reference, for every option."""

import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea
from eqx_attention import _kernels as kernels

SMALL_BLOCKS = {"BLOCK_Q": 4, "BLOCK_K": 8, "FINE_Q": 2, "FINE_K": 4, "DECODE_BLOCK_K": 8}
Q_SEQ, KV_SEQ, HEADS, KV_HEADS, SIZE = 13, 19, 4, 2, 8
# Relative to each array's largest entry: sums of many terms round on that scale.
TOL = 2e-5
# Second derivatives add up more rounding.
TOL2 = 1e-4


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 queries and 8 keys: 13 x 19 spans several, ending mid-block."""
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)


def _normal(key, *shape):
    return jax.random.normal(key, shape)


def _options(name: str, key):
    """Per-example integer arguments, learned float arguments (differentiated, shared by the
    batch) and the call's fixed keyword arguments, for one option."""
    k1, k2 = jax.random.split(key)
    none = {}
    options = {
        "plain": (none, none, none),
        "causal": (none, none, dict(is_causal=True)),
        "window": (none, none, dict(local_window_size=(5, 2))),
        "lengths": (
            dict(query_seq_length=jnp.array([11, 13]), key_value_seq_length=jnp.array([7, 19])),
            none,
            dict(is_causal=True),
        ),
        "segments": (
            dict(
                query_segment_ids=jnp.array([[0] * 6 + [1] * 7, [0] * 2 + [1] * 11]),
                kv_segment_ids=jnp.array([[0] * 9 + [1] * 10, [0] * 3 + [1] * 16]),
            ),
            none,
            none,
        ),
        "softcap_sinks": (
            none,
            dict(sinks=jnp.linspace(-1.0, 1.0, HEADS)),
            dict(logit_softcap=2.0, is_causal=True),
        ),
        "bias_mask": (
            none,
            dict(bias=_normal(k1, HEADS, Q_SEQ, KV_SEQ)),
            dict(mask=jax.random.bernoulli(k2, 0.8, (Q_SEQ, KV_SEQ))),
        ),
        "dropout": (dict(dropout_key=jax.random.split(k1, 2)), none, dict(dropout_p=0.3)),
        "alibi": (none, dict(slopes=jnp.linspace(0.1, 0.4, HEADS)), dict(is_causal=True)),
        "mask_mod": (none, none, dict(mask_mod=lambda q, k: (k < 5) | (q >= k))),
    }
    return options[name]


OPTIONS = [
    "plain", "causal", "window", "lengths", "segments", "softcap_sinks", "bias_mask",
    "dropout", "alibi", "mask_mod",
]  # fmt: skip


def _attend(q, k, v, batched, learned, fixed, implementation):
    """One example; `slopes`, when learned, make an ALiBi `score_mod`."""
    learned = dict(learned)
    slopes = learned.pop("slopes", None)
    if slopes is not None:
        fixed = dict(
            fixed, score_mod=lambda s, h, qp, kp: s - slopes[h] * jnp.abs(qp - kp).astype(s.dtype)
        )
    return ea.dot_product_attention(
        q, k, v, **batched, **learned, **fixed, implementation=implementation
    )


def _problem(key, name, q_seq=Q_SEQ, kv_seq=KV_SEQ):
    """Inputs `(q, k, v, learned)` for a batch of two, tangents for them, and the batched
    attention of those inputs for a given implementation."""
    keys = jax.random.split(key, 7)
    q = _normal(keys[0], 2, q_seq, HEADS, SIZE)
    k = _normal(keys[1], 2, kv_seq, KV_HEADS, SIZE)
    v = _normal(keys[2], 2, kv_seq, KV_HEADS, SIZE)
    batched, learned, fixed = _options(name, keys[3])
    primals = (q, k, v, learned)
    leaves, tree = jax.tree.flatten(primals)
    tangents = jax.tree.unflatten(
        tree,
        [
            _normal(kt, *x.shape)
            for kt, x in zip(jax.random.split(keys[4], len(leaves)), leaves, strict=True)
        ],
    )

    def batch(implementation):
        def attention(q, k, v, learned):
            one = lambda q, k, v, b: _attend(q, k, v, b, learned, fixed, implementation)  # noqa: E731
            return jax.vmap(one)(q, k, v, batched)

        return attention

    return primals, tangents, batch


def _loss(attention):
    return lambda *args: jnp.sum(jnp.sin(attention(*args)))


def _squared_norm(tree):
    """A gradient penalty: the sum of squares of every leaf."""
    return sum(jnp.sum(g**2) for g in jax.tree.leaves(tree))


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, float(jnp.max(jnp.abs(y)))))


@pytest.mark.parametrize("option", OPTIONS)
def test_jvp_matches_reference(option, small_blocks, getkey):
    primals, tangents, batch = _problem(getkey(), option)
    ref = jax.jvp(batch("xla"), primals, tangents)
    got = jax.jit(lambda p, t: jax.jvp(batch("chunked"), p, t))(primals, tangents)
    _close(got, ref, TOL)


@pytest.mark.parametrize("option", OPTIONS)
def test_hessian_vector_product_matches_reference(option, small_blocks, getkey):
    """`jvp` of `grad`, per example under `vmap` (the derivatives inside the batch)."""
    primals, tangents, batch = _problem(getkey(), option)

    def hvp(implementation):
        loss = _loss(batch(implementation))
        return jax.jvp(jax.grad(loss, argnums=(0, 1, 2, 3)), primals, tangents)

    _close(jax.jit(lambda: hvp("chunked"))(), hvp("xla"), TOL2)


@pytest.mark.parametrize("option", OPTIONS)
def test_grad_of_grad_matches_reference(option, small_blocks, getkey):
    """`grad` of a gradient penalty."""
    primals, _, batch = _problem(getkey(), option)

    def penalty(implementation):
        grad = jax.grad(_loss(batch(implementation)), argnums=(0, 1, 2, 3))

        def norm(*args):
            return _squared_norm(grad(*args))

        return jax.grad(norm, argnums=(0, 1, 2, 3))(*primals)

    _close(jax.jit(lambda: penalty("chunked"))(), penalty("xla"), TOL2)


@pytest.mark.parametrize("option", ["plain", "causal", "softcap_sinks", "alibi", "lengths"])
def test_grad_of_jvp_matches_reference(option, small_blocks, getkey):
    """Reverse over forward: `grad` of a loss on a Jacobian-vector product (as in
    physics-informed losses), with respect to the inputs and the tangent."""
    primals, tangents, batch = _problem(getkey(), option)

    def grads(implementation):
        def loss(primals, tangents):
            out, t_out = jax.jvp(batch(implementation), primals, tangents)
            return jnp.sum(jnp.sin(out) * t_out) + jnp.sum(t_out**2)

        return jax.grad(loss, argnums=(0, 1))(primals, tangents)

    _close(jax.jit(lambda: grads("chunked"))(), grads("xla"), TOL2)


def test_derivatives_along_what_only_masks_see_are_zero(small_blocks, getkey):
    """A float that only `mask_mod` reads moves no output: zero tangents and second
    derivatives, not an error."""
    primals, _, batch = _problem(getkey(), "plain")
    q, k, v, _ = primals

    def attend(threshold):
        def one(q, k, v):
            return ea.dot_product_attention(
                q, k, v, mask_mod=lambda qp, kp: kp <= qp + threshold, implementation="chunked"
            )

        return jax.vmap(one)(q, k, v)

    threshold = jnp.float32(2.5)
    _, tangent = jax.jvp(attend, (threshold,), (jnp.float32(1.0),))
    assert not jnp.any(tangent)
    grad = jax.grad(lambda q, t: jnp.sum(jnp.sin(attend(t) * q)))
    _, hvp = jax.jvp(lambda t: grad(q, t), (threshold,), (jnp.float32(1.0),))
    assert not jnp.any(hvp)


def test_derivatives_inside_vmap(small_blocks, getkey):
    """The other nesting: `vmap` of per-example `jvp`, HVP and grad of grad."""
    q, k, v = (
        _normal(getkey(), 2, n, h, SIZE)
        for n, h in ((Q_SEQ, HEADS), (KV_SEQ, KV_HEADS), (KV_SEQ, KV_HEADS))
    )
    tq = _normal(getkey(), *q.shape)
    lengths = jnp.array([7, 19])

    def derivatives(implementation):
        def one(q, k, v, tq, length):
            def attend(q):
                return ea.dot_product_attention(
                    q, k, v, is_causal=True, key_value_seq_length=length,
                    implementation=implementation,
                )  # fmt: skip

            loss = lambda q: jnp.sum(jnp.sin(attend(q)))  # noqa: E731
            jvp = jax.jvp(attend, (q,), (tq,))
            hvp = jax.jvp(jax.grad(loss), (q,), (tq,))
            gg = jax.grad(lambda q: jnp.sum(jax.grad(loss)(q) ** 2))(q)
            return jvp, hvp, gg

        return jax.vmap(one)(q, k, v, tq, lengths)

    _close(jax.jit(lambda: derivatives("chunked"))(), derivatives("xla"), TOL2)


@pytest.mark.parametrize("name", ["alibi", "relative_table"])
def test_jacfwd_with_respect_to_score_mod_parameters(name, small_blocks, getkey):
    """`jacfwd`, `jacrev` (which batches the cotangents alone) and `jax.hessian` in a learned
    mod's array."""
    q = _normal(getkey(), Q_SEQ, HEADS, SIZE)
    k, v = (_normal(getkey(), KV_SEQ, KV_HEADS, SIZE) for _ in range(2))
    shape = (HEADS,) if name == "alibi" else (HEADS, 7)
    params = _normal(getkey(), *shape)

    def attend(params, implementation):
        def mod(s, h, qp, kp):
            if name == "alibi":
                return s - params[h] * jnp.abs(qp - kp).astype(s.dtype)
            return s + params[h, jnp.clip(kp - qp, -3, 3) + 3]

        out = ea.dot_product_attention(
            q, k, v, score_mod=mod, is_causal=True, implementation=implementation
        )
        return out[::3]  # a few rows keep the Jacobian small

    ref = jax.jacfwd(attend)(params, "xla")
    _close(jax.jit(jax.jacfwd(attend), static_argnums=1)(params, "chunked"), ref, TOL)
    _close(jax.jit(jax.jacrev(attend), static_argnums=1)(params, "chunked"), ref, TOL)

    def loss(params, implementation):
        return jnp.sum(jnp.sin(attend(params, implementation)))

    # jax.hessian is jacfwd of jacrev: forward mode over a batch of cotangents.
    hessian = jax.jit(jax.hessian(loss), static_argnums=1)
    _close(hessian(params, "chunked"), jax.hessian(loss)(params, "xla"), TOL2)


@pytest.mark.parametrize("option", ["causal", "softcap_sinks", "alibi", "dropout"])
def test_decode_loop_derivatives(option, small_blocks, getkey):
    """The decode loop (a few queries over a long buffer): jvp, HVP and grad of grad."""
    primals, tangents, batch = _problem(getkey(), option, q_seq=3, kv_seq=37)

    def derivatives(implementation):
        attention = batch(implementation)
        grad = jax.grad(_loss(attention), argnums=(0, 1, 2, 3))
        jvp = jax.jvp(attention, primals, tangents)
        hvp = jax.jvp(grad, primals, tangents)
        gg = jax.grad(lambda *p: _squared_norm(grad(*p)), argnums=(0, 1, 2, 3))(*primals)
        return jvp, hvp, gg

    _close(jax.jit(lambda: derivatives("chunked"))(), derivatives("xla"), TOL2)


@pytest.mark.parametrize("policy", ["nothing_saveable", "everything_saveable", "dots_saveable"])
def test_checkpointed_attention_differentiates(policy, small_blocks, getkey):
    """`jax.checkpoint` (rematerialisation, which partially evaluates the kernel's jvp on a
    jaxpr) around the kernel: grad, HVP and grad of grad, under each saving policy."""
    primals, tangents, batch = _problem(getkey(), "causal")

    def grads(implementation):
        policy_fn = getattr(jax.checkpoint_policies, policy)
        loss = jax.checkpoint(_loss(batch(implementation)), policy=policy_fn)
        grad = jax.grad(loss, argnums=(0, 1, 2))
        penalty = lambda *p: _squared_norm(grad(*p))  # noqa: E731
        gg = jax.grad(penalty, argnums=(0, 1, 2))(*primals)
        return grad(*primals), jax.jvp(grad, primals, tangents), gg

    _close(jax.jit(lambda: grads("chunked"))(), grads("xla"), TOL2)


@pytest.mark.parametrize("option", ["causal", "softcap_sinks", "alibi"])
def test_linearize_and_transpose(option, small_blocks, getkey):
    """`jax.linearize` stages the tangent alone (the forward pass runs once, up front), and
    `jax.linear_transpose` of that linear map is the backward pass: as `jax.vjp` gives."""
    primals, tangents, batch = _problem(getkey(), option)
    out, linear = jax.linearize(batch("chunked"), *primals)
    _, ref_linear = jax.linearize(batch("xla"), *primals)
    _close(linear(*tangents), ref_linear(*tangents), TOL)
    cotangent = jnp.cos(out)
    _close(
        jax.linear_transpose(linear, *primals)(cotangent),
        jax.vjp(batch("xla"), *primals)[1](cotangent),
        TOL,
    )


def test_jacobian_of_a_block_plan_call(small_blocks, getkey):
    """A reusable block plan passed in: forward mode goes through it too."""
    primals, tangents, _ = _problem(getkey(), "plain")
    q, k, v, _ = primals
    ids = jnp.array([0] * 6 + [1] * 7), jnp.array([0] * 9 + [1] * 10)
    plan = ea.make_block_plan(Q_SEQ, KV_SEQ, query_segment_ids=ids[0], kv_segment_ids=ids[1])

    def attend(q, implementation, plan=None):
        return ea.dot_product_attention(
            q, k[0], v[0], query_segment_ids=ids[0], kv_segment_ids=ids[1],
            implementation=implementation, block_plan=plan,
        )  # fmt: skip

    ref = jax.jvp(lambda q: attend(q, "xla"), (q[0],), (tangents[0][0],))
    got = jax.jvp(lambda q: attend(q, "chunked", plan), (q[0],), (tangents[0][0],))
    _close(got, ref, TOL)


_MEMORY_SCRIPT = """
import resource, jax, jax.numpy as jnp
import eqx_attention as ea
T, H, D = {T}, 1, 32
q, k, v = (jax.random.normal(jax.random.key(i), (T, H, D)) for i in range(3))
tangent = jax.random.normal(jax.random.key(3), (T, H, D))

@jax.jit
def jvp(q, k, v, tangent):
    attend = lambda q, k, v: ea.dot_product_attention(
        q, k, v, is_causal=True, implementation="chunked")
    return jax.jvp(attend, (q, k, v), (tangent, tangent, tangent))

compiled = jvp.lower(q, k, v, tangent).compile()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
jax.block_until_ready(compiled(q, k, v, tangent))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(compiled.memory_analysis().temp_size_in_bytes, (after - before) * 1024)
"""


def test_jvp_memory_is_linear_in_length():
    """At T=8192 one head's logits alone would take 256 MiB: forward mode stays far below,
    both in XLA's temporaries and in the process's peak memory (a fresh process)."""
    T = 8192
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MEMORY_SCRIPT.format(T=T))],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    temp, grown = map(int, result.stdout.split())
    logits = T * T * 4
    assert temp < logits / 16, (temp, logits)
    assert grown < logits / 4, (grown, logits)


def test_scan_over_layers_and_a_module(small_blocks, getkey):
    """Model code: `MultiheadAttention` layers under `lax.scan`, differentiated by `grad`,
    `jvp` in the weights, and `grad` of `grad`."""
    q_seq, features = 21, 16
    make = lambda key: ea.MultiheadAttention(num_heads=4, query_size=features, key=key)  # noqa: E731
    layers = eqx.filter_vmap(make)(jax.random.split(getkey(), 2))
    params, static = eqx.partition(layers, eqx.is_inexact_array)
    x = _normal(getkey(), q_seq, features)
    tangent = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)

    def model(params, implementation):
        def layer(x, p):
            mha = eqx.combine(p, static)
            return x + mha(x, is_causal=True, implementation=implementation), None

        return jax.lax.scan(layer, x, params)[0]

    def derivatives(implementation):
        loss = lambda p: jnp.sum(jnp.sin(model(p, implementation)))  # noqa: E731
        grad = jax.grad(loss)(params)
        jvp = jax.jvp(lambda p: model(p, implementation), (params,), (tangent,))
        gg = jax.grad(lambda p: _squared_norm(jax.grad(loss)(p)))(params)
        return grad, jvp, gg

    _close(jax.jit(lambda: derivatives("chunked"))(), derivatives("xla"), TOL2)


def test_forward_mode_to_third_order(small_blocks, getkey):
    """`jvp` of `jvp` (second order) and of that again (third), against the reference."""
    primals, tangents, batch = _problem(getkey(), "causal")

    def derivatives(implementation):
        def along(f):
            return lambda *p: jax.jvp(f, p, tangents)[1]

        first = along(batch(implementation))
        second = along(first)
        return first(*primals), second(*primals), along(second)(*primals)

    _close(jax.jit(lambda: derivatives("chunked"))(), derivatives("xla"), TOL2)

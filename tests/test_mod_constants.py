"""Mods as users write them: constants a mod builds inside itself (NumPy arrays, `jnp.asarray`
of NumPy, Python scalars), mods whose value is a constant, and one compile per distinct mod.

The mask zoo is ported from FlexAttention's examples (documents, random block tables, ALiBi
with inline slopes); each runs forward and backward on every implementation against `"xla"`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea
from eqx_attention._kernels import _chunked, _decode

TOL = {"rtol": 2e-5, "atol": 2e-5}
HEADS, SEQ = 4, 24
# The blockwise kernel, and its decoding loop (few queries, no plan).
KERNELS = {"chunked": ("chunked", SEQ), "decode": ("chunked", 5)}


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _documents():
    ids = np.repeat(np.arange(3), [7, 10, 7])  # NumPy, used inside the mod

    def mask_mod(q_pos, kv_pos):
        return jnp.asarray(ids)[q_pos] == jnp.asarray(ids)[kv_pos]

    return {"mask_mod": mask_mod}


def _random_block_table():
    table = np.random.default_rng(5).random((SEQ // 4, SEQ // 4)) < 0.5
    table[np.arange(SEQ // 4), np.arange(SEQ // 4)] = True  # every row sees some block

    def mask_mod(q_pos, kv_pos):
        return jnp.asarray(table)[q_pos // 4, kv_pos // 4]

    return {"mask_mod": mask_mod}


def _alibi_inline():
    slopes = 2.0 ** -np.arange(1, HEADS + 1, dtype=np.float32)

    def score_mod(score, head, q_pos, kv_pos):
        return score - jnp.asarray(slopes)[head] * jnp.abs(q_pos - kv_pos).astype(jnp.float32)

    return {"score_mod": score_mod, "is_causal": True}


def _scalars():
    """NumPy and Python scalars, as they are and through `jnp.asarray`."""

    def score_mod(score, head, q_pos, kv_pos):
        distance = (q_pos - kv_pos).astype(jnp.float32)
        return score * np.float32(0.5) + jnp.asarray(0.25) * distance + jnp.asarray(np.float32(1))

    return {"score_mod": score_mod, "mask_mod": lambda q, k: k <= q + np.int32(3)}


ZOO = {
    "documents": _documents,
    "random_block_table": _random_block_table,
    "alibi_inline": _alibi_inline,
    "scalars": _scalars,
}


def _loss(impl, q_seq, **options):
    def loss(q, k, v):
        out = ea.dot_product_attention(q, k, v, implementation=impl, **options)
        return jnp.sum(jnp.sin(out))

    return loss


@pytest.mark.parametrize("case", list(ZOO))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_mask_zoo_forward_and_backward(case, kernel, small_blocks):
    impl, q_seq = KERNELS[kernel]
    rng = np.random.default_rng(0)
    q = _normal(rng, q_seq, HEADS, 8)
    k, v = _normal(rng, SEQ, 2, 8), _normal(rng, SEQ, 2, 8)
    options = ZOO[case]()
    want = jax.value_and_grad(_loss("xla", q_seq, **options), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.value_and_grad(_loss(impl, q_seq, **options), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("case", ["documents", "alibi_inline"])
@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_mask_zoo_under_vmap_and_grad(case, impl, small_blocks):
    rng = np.random.default_rng(1)
    q, k, v = (_normal(rng, 2, SEQ, HEADS, 8) for _ in range(3))
    options = ZOO[case]()

    def loss(impl):
        def one(q, k, v):
            return ea.dot_product_attention(q, k, v, implementation=impl, **options)

        return lambda q, k, v: jnp.sum(jnp.sin(jax.vmap(one)(q, k, v)))

    want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, **TOL)


def test_mask_zoo_block_plan(small_blocks):
    rng = np.random.default_rng(2)
    q, k, v = (_normal(rng, SEQ, 2, 8) for _ in range(3))
    options = _random_block_table()
    plan = ea.make_block_plan(SEQ, SEQ, **options)
    got = ea.dot_product_attention(q, k, v, implementation="chunked", block_plan=plan, **options)
    want = ea.dot_product_attention(q, k, v, implementation="xla", **options)
    np.testing.assert_allclose(got, want, **TOL)


CONSTANT_MODS = {
    "mask_true": ({"mask_mod": lambda q, k: True}, {}),
    "mask_false_is_causal": ({"mask_mod": lambda q, k: False, "is_causal": True}, None),
    "score_zero": ({"score_mod": lambda s, h, q, k: 0.0}, {"scale": 0.0}),
    "score_numpy_constant": ({"score_mod": lambda s, h, q, k: np.float32(1.5)}, {"scale": 0.0}),
}


@pytest.mark.parametrize("case", list(CONSTANT_MODS))
@pytest.mark.parametrize("kernel", ["xla", *KERNELS])
def test_constant_mods_broadcast(case, kernel, small_blocks):
    """A mod whose value does not depend on its arguments broadcasts over the block: the
    same as no mask, no key at all, or constant logits (uniform weights)."""
    impl, q_seq = KERNELS.get(kernel, ("xla", SEQ))
    options, same_as = CONSTANT_MODS[case]
    rng = np.random.default_rng(3)
    q = _normal(rng, q_seq, HEADS, 8)
    k, v = _normal(rng, SEQ, 2, 8), _normal(rng, SEQ, 2, 8)
    got = ea.dot_product_attention(q, k, v, implementation=impl, **options)
    if same_as is None:
        want = jnp.zeros_like(got)
    else:
        want = ea.dot_product_attention(q, k, v, implementation="xla", **same_as)
    np.testing.assert_allclose(got, want, **TOL)
    grads = jax.grad(_loss(impl, q_seq, **options), argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_constant_mask_mod_in_make_block_plan(small_blocks):
    rng = np.random.default_rng(4)
    q, k, v = (_normal(rng, SEQ, 2, 8) for _ in range(3))
    for value in (True, False):
        mod = lambda q, k, value=value: value  # noqa: E731
        plan = ea.make_block_plan(SEQ, SEQ, mask_mod=mod)
        got = ea.dot_product_attention(q, k, v, mask_mod=mod, block_plan=plan)
        want = ea.dot_product_attention(q, k, v) if value else jnp.zeros_like(got)
        np.testing.assert_allclose(got, want, **TOL)


def _count_traces(monkeypatch):
    """Count how often the blockwise kernel's and the decoding loop's forward passes are
    traced: once per compile of a kernel, never again for a cached one."""
    counts = {"chunked": 0, "decode": 0}
    for name, module in (("chunked", _chunked), ("decode", _decode)):

        def counting(*args, name=name, forward=module._forward):
            counts[name] += 1
            return forward(*args)

        monkeypatch.setattr(module, "_forward", counting)
    jax.clear_caches()
    return counts


def _document_ids(boundary):
    return jnp.asarray(np.repeat(np.arange(2), [boundary, SEQ - boundary]), jnp.int32)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_one_compile_per_distinct_mod(kernel, small_blocks, monkeypatch):
    """Eager calls with the same mod, with a structurally equal one (same jaxpr, other
    captured values) and with one that builds its constants inside itself compile once."""
    impl, q_seq = KERNELS[kernel]
    rng = np.random.default_rng(6)
    q = _normal(rng, q_seq, HEADS, 8)
    k, v = _normal(rng, SEQ, 2, 8), _normal(rng, SEQ, 2, 8)
    counts = _count_traces(monkeypatch)
    calls = {
        "same mod": [ea.document_mask_mod(_document_ids(9))] * 3,
        "equal mods": [ea.document_mask_mod(_document_ids(b)) for b in (5, 9, 13)],
        "inline NumPy": [_documents()["mask_mod"] for _ in range(3)],
        "inline slopes": [_alibi_inline()["score_mod"] for _ in range(3)],
    }
    for what, mods in calls.items():
        name = "score_mod" if what == "inline slopes" else "mask_mod"
        seen = []
        for mod in mods:
            jax.block_until_ready(
                ea.dot_product_attention(q, k, v, implementation=impl, **{name: mod})
            )
            seen.append(counts[kernel])
        assert seen[0] > 0, "the kernel should have been traced"
        assert seen[1:] == seen[:1] * 2, f"{what}: traced again, {seen}"
    # A different mod is a different kernel.
    before = counts[kernel]
    mod = lambda q_pos, kv_pos: (kv_pos <= q_pos) | (kv_pos < 3)  # noqa: E731
    ea.dot_product_attention(q, k, v, implementation=impl, mask_mod=mod)
    assert counts[kernel] > before

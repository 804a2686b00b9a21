"""A block plan must match its call: a plan built for other masking raises a `ValueError` naming
the difference, on every implementation (also below the size where the automatic choice
ignores the plan), and under `jit` (at run time, where the values are traced)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea
from eqx_attention import _kernels as kernels

SMALL_BLOCKS = {"BLOCK_Q": 4, "BLOCK_K": 8, "FINE_Q": 2, "FINE_K": 4}
SEQ = 48
IMPLEMENTATIONS = [None, "xla", "chunked"]


@pytest.fixture
def small_blocks(monkeypatch):
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)


def _qkv(seed=0, q_seq=SEQ):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((q_seq, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((SEQ, 2, 8)), jnp.float32) for _ in range(2))
    return q, k, v


def _documents(count):
    ids = jnp.asarray(np.arange(SEQ) * count // SEQ, jnp.int32)
    return {"query_segment_ids": ids, "kv_segment_ids": ids}


def _dense(seed):
    return jnp.asarray(np.random.default_rng(seed).random((SEQ, SEQ)) < 0.7)


# (what the plan was built for, what the call has, what the error names)
MISMATCHES = {
    "causal_plan_non_causal_call": ({"is_causal": True}, {}, "is_causal=True"),
    "no_mask_plan_causal_call": ({}, {"is_causal": True}, "is_causal=False"),
    "causal_plan_with_segments_call": (
        {"is_causal": True},
        {**_documents(3)},
        "is_causal=True",
    ),
    "three_documents_one_document": (_documents(3), _documents(1), "query_segment_ids"),
    "window_plan_causal_call": (
        {"is_causal": True, "local_window_size": (8, 0)},
        {"is_causal": True},
        r"local_window_size=\(8, 0\)",
    ),
    "prefix_lm": (
        {"mask_mod": ea.prefix_lm_mask_mod(10)},
        {"mask_mod": ea.prefix_lm_mask_mod(30)},
        "mask_mod",
    ),
    "prefix_lm_array": (
        {"mask_mod": ea.prefix_lm_mask_mod(jnp.int32(10))},
        {"mask_mod": ea.prefix_lm_mask_mod(jnp.int32(30))},
        "mask_mod",
    ),
    "document_mod": (
        {"mask_mod": ea.document_mask_mod(_documents(3)["kv_segment_ids"])},
        {"mask_mod": ea.document_mask_mod(_documents(1)["kv_segment_ids"])},
        "mask_mod",
    ),
    "no_mod_plan": ({}, {"mask_mod": ea.prefix_lm_mask_mod(10)}, "mask_mod"),
    "kv_length": (
        {"key_value_seq_length": 20},
        {"key_value_seq_length": 40},
        "key_value_seq_length=20.*40",
    ),
    "kv_length_missing": ({"key_value_seq_length": 20}, {}, "key_value_seq_length=20.*48"),
    "query_length": ({"query_seq_length": 20}, {"query_seq_length": 21}, "query_seq_length"),
    "query_offset": ({"is_causal": True, "query_offset": 4}, {"is_causal": True}, "query_offset"),
    "key_positions": (
        {"key_positions": jnp.arange(SEQ, dtype=jnp.int32)[::-1]},
        {"key_positions": jnp.arange(SEQ, dtype=jnp.int32)},
        "key_positions",
    ),
    "dense_mask": ({"mask": _dense(0)}, {"mask": _dense(1)}, "mask"),
    "dense_mask_missing": ({"mask": _dense(0)}, {}, "mask"),
    "dense_mask_heads": (
        {"mask": jnp.stack([_dense(0), _dense(1)])},
        {"mask": _dense(0)},
        "mask",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_plan_for_other_masking_is_refused(case, implementation, small_blocks):
    built_for, call, named = MISMATCHES[case]
    q, k, v = _qkv()
    plan = ea.make_block_plan(SEQ, SEQ, **built_for)
    with pytest.raises(ValueError, match=f"block_plan was built for .*{named}"):
        ea.dot_product_attention(q, k, v, block_plan=plan, implementation=implementation, **call)


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_plan_for_other_masking_is_refused_under_jit(case, small_blocks):
    """Static differences raise when tracing; traced values differing raise at run time."""
    built_for, call, named = MISMATCHES[case]
    q, k, v = _qkv()
    arrays, static = eqx.partition(call, eqx.is_array)

    @jax.jit
    def attend(q, plan, arrays):
        options = eqx.combine(arrays, static)
        return ea.dot_product_attention(q, k, v, block_plan=plan, **options)

    plan = jax.jit(lambda: ea.make_block_plan(SEQ, SEQ, **built_for))()
    with pytest.raises(Exception, match=f"block_plan was built for .*{named.split('=')[0]}"):
        jax.block_until_ready(attend(q, plan, arrays))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True},
        {**_documents(3), "is_causal": True, "key_value_seq_length": 40},
        {"mask_mod": ea.prefix_lm_mask_mod(10), "local_window_size": (16, 0)},
        {"mask_mod": ea.document_mask_mod(_documents(3)["kv_segment_ids"])},
        {"mask": _dense(0), "query_offset": 3, "is_causal": True},
        {"key_positions": jnp.arange(SEQ, dtype=jnp.int32)[::-1], "query_seq_length": 30},
    ],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matching_plan_is_accepted(options, implementation, small_blocks):
    """Eagerly and under `jit`, where the traced values are compared at run time (the
    blockwise kernel under `jit` only, to keep the test short: the check runs before any
    implementation, and eagerly the same for all)."""
    q, k, v = _qkv()
    plan = ea.make_block_plan(SEQ, SEQ, **options)
    want = ea.dot_product_attention(q, k, v, implementation="xla", **options)
    if implementation != "chunked":
        got = ea.dot_product_attention(
            q, k, v, block_plan=plan, implementation=implementation, **options
        )
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    arrays, static = eqx.partition(options, eqx.is_array)

    @jax.jit
    def attend(q, plan, arrays):
        return ea.dot_product_attention(
            q, k, v, block_plan=plan, implementation=implementation,
            **eqx.combine(arrays, static),
        )  # fmt: skip

    np.testing.assert_allclose(attend(q, plan, arrays), want, rtol=2e-5, atol=2e-5)


def test_plan_mask_heads_in_any_layout_match(small_blocks):
    """A mask's heads are compared as given, whatever the key/value head grouping."""
    q, k, v = _qkv()
    mask = jnp.stack([_dense(0), _dense(1)])
    plan = ea.make_block_plan(SEQ, SEQ, mask)
    # Built with one key/value head (heads as a group of two), used with two.
    got = ea.dot_product_attention(q, k, v, mask=mask, block_plan=plan, implementation="chunked")
    want = ea.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_batch_of_plans_is_checked_per_example(small_blocks):
    """Plans built under vmap, used under vmap: one example's documents differ."""
    q, k, v = (jnp.stack([x, x]) for x in _qkv())
    ids = jnp.stack([_documents(3)["kv_segment_ids"], _documents(2)["kv_segment_ids"]])
    plans = jax.vmap(
        lambda ids: ea.make_block_plan(SEQ, SEQ, query_segment_ids=ids, kv_segment_ids=ids)
    )(ids)

    def attend(q, k, v, ids, plan):
        return ea.dot_product_attention(
            q, k, v, query_segment_ids=ids, kv_segment_ids=ids, block_plan=plan
        )

    jax.vmap(attend)(q, k, v, ids, plans)  # the right plans
    with pytest.raises(ValueError, match="block_plan was built for .*query_segment_ids"):
        jax.vmap(attend)(q, k, v, ids[::-1], plans)
    with pytest.raises(Exception, match="block_plan was built for .*query_segment_ids"):
        jax.block_until_ready(jax.jit(jax.vmap(attend))(q, k, v, ids[::-1], plans))


def test_plan_grid_is_still_checked(small_blocks):
    q, k, v = _qkv(q_seq=20)
    plan = ea.make_block_plan(SEQ, SEQ)
    with pytest.raises(ValueError, match="block_plan was built for q_seq=48, kv_seq=48"):
        ea.dot_product_attention(q, k, v, block_plan=plan, implementation="xla")


def test_mismatch_is_found_under_grad(small_blocks):
    q, k, v = _qkv()
    plan = ea.make_block_plan(SEQ, SEQ, key_value_seq_length=20)

    def loss(q):
        return jnp.sum(ea.dot_product_attention(q, k, v, block_plan=plan))

    with pytest.raises(ValueError, match="key_value_seq_length=20"):
        jax.grad(loss)(q)
    with pytest.raises(Exception, match="key_value_seq_length"):
        jax.block_until_ready(jax.jit(jax.grad(loss))(q))

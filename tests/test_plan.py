"""The block plan: its classification of block pairs, and that the kernel visits only the
non-empty ones, in every pass and under `jax.vmap` (where a `lax.cond` would compute both
branches and skip nothing)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import eqx_attention as ea
from eqx_attention import _kernels as kernels
from eqx_attention._functional import _prepare
from eqx_attention._kernels import _chunked, _plan
from eqx_attention._kernels._plan import EMPTY, FULL, PARTIAL, block_states, make_plan
from eqx_attention._spec import replace

BQ, BK = 4, 8
SMALL_BLOCKS = {"BLOCK_Q": BQ, "BLOCK_K": BK, "FINE_Q": 2, "FINE_K": 4}


def _spec(q_seq, kv_seq, num_heads=2, **options):
    q, k = jnp.zeros((q_seq, num_heads, 4)), jnp.zeros((kv_seq, 1, 4))
    spec, *_ = _prepare(q, k, k, **options)
    return spec


def _dense_visible(spec):
    """`[num_heads, q_seq, kv_seq]` visibility, straight from the spec on the whole grid."""
    visible = spec.visible(jnp.arange(spec.q_seq), jnp.arange(spec.kv_seq), spec.mask)
    visible = True if visible is None else visible
    shape = (spec.num_kv_heads, spec.group, spec.q_seq, spec.kv_seq)
    return np.asarray(jnp.broadcast_to(visible, shape)).reshape(-1, spec.q_seq, spec.kv_seq)


def _expected_states(visible):
    """Brute force: classify each block pair of the (unpadded) grid."""
    _, q_seq, kv_seq = visible.shape
    num_q, num_k = -(-q_seq // BQ), -(-kv_seq // BK)
    states = np.zeros((num_q, num_k), int)
    for i in range(num_q):
        for j in range(num_k):
            block = visible[:, i * BQ : (i + 1) * BQ, j * BK : (j + 1) * BK]
            whole = block.shape[2] == BK  # a block holding key padding cannot be full
            states[i, j] = FULL if whole and block.all() else PARTIAL if block.any() else EMPTY
    return states


@st.composite
def _problems(draw):
    q_seq, kv_seq = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    options = {}
    if draw(st.booleans()):
        options["is_causal"] = True
    if draw(st.booleans()):
        options["local_window_size"] = (draw(st.integers(0, 12)), draw(st.integers(0, 12)))
    if draw(st.booleans()):
        options["query_seq_length"] = draw(st.integers(0, q_seq))
    if draw(st.booleans()):
        options["key_value_seq_length"] = draw(st.integers(0, kv_seq))
    if draw(st.booleans()):
        options["query_offset"] = draw(st.integers(-5, kv_seq + 5))
    if draw(st.booleans()):
        docs = draw(st.lists(st.integers(0, 3), min_size=kv_seq, max_size=kv_seq))
        kv_ids = jnp.asarray(sorted(docs), jnp.int32)
        options["kv_segment_ids"] = kv_ids
        options["query_segment_ids"] = kv_ids[kv_seq - q_seq :] if q_seq <= kv_seq else None
        if options["query_segment_ids"] is None:
            del options["kv_segment_ids"], options["query_segment_ids"]
    if draw(st.booleans()):
        prefix = draw(st.integers(0, 10))
        options["mask_mod"] = lambda q_pos, kv_pos: (kv_pos <= q_pos) | (kv_pos < prefix)
    if draw(st.booleans()):
        bits = draw(
            st.lists(st.booleans(), min_size=2 * q_seq * kv_seq, max_size=2 * q_seq * kv_seq)
        )
        options["mask"] = jnp.asarray(bits).reshape(2, q_seq, kv_seq)
    return q_seq, kv_seq, options


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=_problems())
def test_states_match_brute_force(problem):
    """Every state is sound (an empty block hides every pair, a full one none), and exact
    but for one case: segment ids combined with causality, windows or lengths are classified
    source by source, so a pair of blocks each source leaves partly visible, but jointly
    empty, is called partial (visited and masked)."""
    q_seq, kv_seq, options = problem
    spec = _spec(q_seq, kv_seq, **options)
    expected = _expected_states(_dense_visible(spec))
    pad_q, pad_k = -q_seq % BQ, -kv_seq % BK
    if spec.mask is not None:
        spec = replace(spec, mask=_chunked._pad_dense(spec.mask, pad_q, pad_k, False))
    states = np.asarray(block_states(spec, BQ, BK))
    by_source = spec.q_segment_ids is not None and spec.mask is None and spec.mask_mod is None
    interval = ("is_causal", "local_window_size", "query_seq_length", "key_value_seq_length")
    interval += ("query_offset",)
    if by_source and any(name in options for name in interval):
        states = np.where((states == PARTIAL) & (expected == EMPTY), EMPTY, states)
    np.testing.assert_array_equal(states, expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=_problems())
def test_interval_states_match_pair_by_pair_classification(problem):
    """Causality, windows, lengths and offsets are classified from block corners; the same
    spec with an always-true `mask_mod` goes through the pair-by-pair classification."""
    q_seq, kv_seq, options = problem
    for name in ("query_segment_ids", "kv_segment_ids", "mask_mod", "mask"):
        options.pop(name, None)
    corners = block_states(_spec(q_seq, kv_seq, **options), BQ, BK)
    pairs = block_states(_spec(q_seq, kv_seq, **options, mask_mod=lambda q, k: q == q), BQ, BK)
    np.testing.assert_array_equal(np.asarray(corners), np.asarray(pairs))


def test_lists_are_compact_and_ordered():
    ids = jnp.array([0] * 8 + [1] * 16 + [2] * 8)
    spec = _spec(32, 32, query_segment_ids=ids, kv_segment_ids=ids, is_causal=True)
    plan = make_plan(spec, BQ, BK)
    states = np.asarray(block_states(spec, BQ, BK))
    for i in range(8):
        full, partial = (int(c) for c in plan.kv_count[i])
        assert list(plan.kv_index[i, 0, :full]) == list(np.flatnonzero(states[i] == FULL))
        assert list(plan.kv_index[i, 1, :partial]) == list(np.flatnonzero(states[i] == PARTIAL))
    for j in range(4):
        full, partial = (int(c) for c in plan.q_count[j])
        assert list(plan.q_index[j, 0, :full]) == list(np.flatnonzero(states[:, j] == FULL))
        assert list(plan.q_index[j, 1, :partial]) == list(np.flatnonzero(states[:, j] == PARTIAL))


def _count_blocks(monkeypatch):
    """Patch the kernel's block steps to count the calls that run (per example under vmap)."""
    counts = {"forward": 0, "backward": 0}

    def counting(name, step):
        def wrapped(*args, **kwargs):
            # The query block is batched data under vmap, so the callback fires per example.
            q_blk = args[1] if name == "forward" else args[0]

            def bump(start):
                # Under vmap the callback sees either one example's value or the batch's.
                counts[name] += np.size(start)

            jax.debug.callback(bump, q_blk.reshape(-1)[0])
            return step(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(_chunked, "block_forward", counting("forward", _chunked.block_forward))
    monkeypatch.setattr(_chunked, "block_backward", counting("backward", _chunked.block_backward))
    return counts


@pytest.mark.parametrize(
    "case",
    ["documents", "documents_causal", "mask_mod_prefix", "dense_mask", "lengths"],
)
def test_kernel_visits_only_non_empty_blocks_under_vmap(case, monkeypatch):
    """Two examples with different patterns: each pass runs exactly as many block steps as
    the example with the most non-empty blocks needs (vmap runs the loops in lockstep, and
    the callback fires for each example), and not a step for a block both leave empty."""
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)
    seq = 32
    docs = jnp.array([[0] * 8 + [1] * 8 + [2] * 16, [0] * 24 + [1] * 8])
    per_example = {
        "documents": lambda b: dict(query_segment_ids=docs[b], kv_segment_ids=docs[b]),
        "documents_causal": lambda b: dict(
            query_segment_ids=docs[b], kv_segment_ids=docs[b], is_causal=True
        ),
        "mask_mod_prefix": lambda b: dict(mask_mod=lambda q, k, p=4 + 8 * b: (k <= q) | (k < p)),
        "dense_mask": lambda b: dict(mask=(docs[b][:, None] == docs[b][None, :])),
        "lengths": lambda b: dict(key_value_seq_length=jnp.array([9, 14])[b]),
    }[case]
    # Which blocks each example needs, from the same brute force as above.
    states = np.stack(
        [
            _expected_states(_dense_visible(_spec(seq, seq, num_heads=1, **per_example(b))))
            for b in range(2)
        ]
    )
    assert np.sum(states[0] != EMPTY) < states[0].size, "the case should skip something"
    # Each loop (full blocks, then partial ones) runs as long as the example that needs the
    # most steps there: per query block in the forward pass, per key block in the backward.
    kinds = np.stack([states == FULL, states == PARTIAL])  # [kind, example, q block, k block]
    forward = int(np.sum(np.max(kinds.sum(axis=3), axis=1)))
    backward = int(np.sum(np.max(kinds.sum(axis=2), axis=1)))
    assert forward < states[0].size and backward < states[0].size

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, seq, 1, 4)), jnp.float32) for _ in range(3))
    # Batched options: stack the two examples' arrays (mask_mod closes over a batched prefix).
    if case == "mask_mod_prefix":
        prefix = jnp.array([4, 12])

        def one(q, k, v, p):
            return ea.dot_product_attention(
                q, k, v, mask_mod=lambda qp, kp: (kp <= qp) | (kp < p), implementation="chunked"
            )

        args = (q, k, v, prefix)
    else:
        arrays = [{n: x for n, x in per_example(b).items() if eqx.is_array(x)} for b in range(2)]
        static = {n: x for n, x in per_example(0).items() if not eqx.is_array(x)}
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *arrays)

        def one(q, k, v, opts):
            return ea.dot_product_attention(q, k, v, implementation="chunked", **opts, **static)

        args = (q, k, v, stacked)
    counts = _count_blocks(monkeypatch)
    out, vjp = jax.vjp(lambda q, k, v: jax.vmap(one)(q, k, v, args[3]), q, k, v)
    jax.block_until_ready(vjp(jnp.ones_like(out)))
    assert counts == {"forward": 2 * forward, "backward": 2 * backward}, (forward, backward)


def test_reused_plan_equals_a_fresh_one_and_is_checked(monkeypatch):
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 30, 2, 4)), jnp.float32) for _ in range(3))
    ids = jnp.array([[0] * 10 + [1] * 20, [0] * 25 + [1] * 5])
    options = dict(is_causal=True, key_value_seq_length=27)

    def plan(ids):
        return ea.make_block_plan(30, 30, query_segment_ids=ids, kv_segment_ids=ids, **options)

    plans = jax.vmap(plan)(ids)  # one plan per example, reused by two layers below

    def two_layers(q, k, v, ids, plan):
        def layer(x):
            return ea.dot_product_attention(
                x, k, v, query_segment_ids=ids, kv_segment_ids=ids, block_plan=plan,
                implementation="chunked", **options,
            )  # fmt: skip

        return layer(layer(q))

    def fresh(q, k, v, ids):
        return two_layers(q, k, v, ids, None)

    got, grads = jax.value_and_grad(
        lambda q: jnp.sum(jax.vmap(two_layers)(q, k, v, ids, plans) ** 2)
    )(q)
    want, want_grads = jax.value_and_grad(lambda q: jnp.sum(jax.vmap(fresh)(q, k, v, ids) ** 2))(q)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(grads, want_grads, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="block_plan was built for q_seq=30, kv_seq=30"):
        ea.dot_product_attention(
            q[0, :20], k[0], v[0], block_plan=jax.tree.map(lambda x: x[0], plans),
            implementation="chunked",
        )  # fmt: skip


def test_multihead_attention_takes_mask_mods_and_a_shared_plan(getkey):
    """Packed documents through MultiheadAttention: a mask_mod, the same as a dense mask,
    and one plan shared by two layers."""
    layers = [ea.MultiheadAttention(4, 32, num_kv_heads=2, key=getkey()) for _ in range(2)]
    seq = 700
    ids = jnp.asarray(np.repeat(np.arange(3), [200, 300, 200]))
    x = jax.random.normal(getkey(), (seq, 32))
    dense = ids[:, None] == ids[None, :]
    mod = ea.document_mask_mod(ids)
    plan = ea.make_block_plan(seq, seq, mask_mod=mod, is_causal=True)

    def model(x, **options):
        for layer in layers:
            x = layer(x, is_causal=True, implementation="chunked", **options)
        return x

    want = model(x, mask=dense)
    np.testing.assert_allclose(model(x, mask_mod=mod), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(model(x, mask_mod=mod, block_plan=plan), want, atol=1e-5, rtol=1e-5)
    # A cache's blocks change with every write (mask_mods work with one: test_decode.py).
    with pytest.raises(ValueError, match="block_plan is not supported with a cache"):
        layers[0](x[:4], cache=layers[0].init_cache(8), block_plan=plan)


def test_segment_ids_in_no_order_are_visited_and_masked(monkeypatch, getkey):
    """Ids in no order: a block pair whose id ranges meet without sharing an id is partial,
    and the kernel's mask keeps the result exact."""
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)
    q_ids = jnp.array([0, 2, 0, 2] * 4, jnp.int32)  # one query block of ids {0, 2}
    kv_ids = jnp.array([1] * 8 + [2] * 8 + [3] * 8, jnp.int32)
    spec = _spec(16, 24, query_segment_ids=q_ids, kv_segment_ids=kv_ids)
    # Key block 0 holds only id 1: its range meets [0, 2] but no query shares it.
    assert np.asarray(block_states(spec, BQ, BK))[0].tolist() == [PARTIAL, PARTIAL, EMPTY]
    kq, kk, kv = jax.random.split(getkey(), 3)
    q = jax.random.normal(kq, (16, 2, 4))
    k, v = jax.random.normal(kk, (24, 2, 4)), jax.random.normal(kv, (24, 2, 4))

    def loss(q, k, v, implementation):
        out = ea.dot_product_attention(
            q, k, v, query_segment_ids=q_ids, kv_segment_ids=kv_ids,
            implementation=implementation,
        )  # fmt: skip
        return jnp.sum(jnp.sin(out))

    for a, b in zip(
        jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "xla"),
        jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "chunked"),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ids", ["one_document", "same_documents", "different_documents"])
def test_lists_shared_by_the_batch_are_read_as_ranges(ids, monkeypatch):
    """Where every example's list is the same range (nothing skipped, or the same packing),
    the kernel loops over it with plain slices, not per-example gathers; either way the
    results match the reference, forward and backward."""
    for name, size in SMALL_BLOCKS.items():
        monkeypatch.setattr(kernels, name, size)
    ranged = []
    shared_lists = _plan._as_range_if_shared

    def counting(count, index, needs_mask, step, gathered, carry, **kwargs):
        def counted(block, needs_mask, c):
            jax.debug.callback(lambda: ranged.append(1))
            return step(block, needs_mask, c)

        return shared_lists(count, index, needs_mask, counted, gathered, carry, **kwargs)

    monkeypatch.setattr(_plan, "_as_range_if_shared", counting)
    # Eager calls reuse kernels compiled by earlier tests, which this patch would not reach.
    jax.clear_caches()
    docs = {
        "one_document": jnp.zeros((2, 30), jnp.int32),
        "same_documents": jnp.array([[0] * 12 + [1] * 18] * 2),
        "different_documents": jnp.array([[0] * 12 + [1] * 18, [0] * 20 + [1] * 10]),
    }[ids]
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 30, 2, 4)), jnp.float32) for _ in range(3))

    def loss(q, k, v, implementation):
        def one(q, k, v, ids):
            return ea.dot_product_attention(
                q, k, v, query_segment_ids=ids, kv_segment_ids=ids,
                implementation=implementation,
            )  # fmt: skip

        return jnp.sum(jnp.sin(jax.vmap(one)(q, k, v, docs)))

    ref = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
    got = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "chunked")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
    if ids == "different_documents":
        # Query block 3 (rows 12-15) sees key blocks 1-3 in the first example, 2-3 in the other.
        return
    assert ranged, "shared lists should be read as ranges"

"""The ready-made mask_mods against masks spelled out position by position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea

SEQ = 12


def _visible(mask_mod, **options):
    q = jnp.zeros((SEQ, 1, 4))
    weights = ea.dot_product_attention_weights(q, q, mask_mod=mask_mod, **options)
    return np.asarray(weights[0] > 0)


def _expected(rule):
    return np.array([[bool(rule(i, j)) for j in range(SEQ)] for i in range(SEQ)])


IDS = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])
CASES = {
    "document": (ea.document_mask_mod(jnp.asarray(IDS)), lambda i, j: IDS[i] == IDS[j]),
    "prefix_lm": (ea.prefix_lm_mask_mod(4), lambda i, j: j <= i or j < 4),
    "chunked": (ea.chunked_mask_mod(5), lambda i, j: i // 5 == j // 5 and j <= i),
    "global_tokens": (ea.global_tokens_mask_mod(2), lambda i, j: i < 2 or j < 2),
    "sliding_window": (ea.sliding_window_mask_mod(2, 1), lambda i, j: i - 2 <= j <= i + 1),
    "streaming": (
        ea.and_mask_mods(
            ea.or_mask_mods(ea.global_tokens_mask_mod(2), ea.sliding_window_mask_mod(3)),
            lambda q, k: k <= q,
        ),
        lambda i, j: j <= i and (j < 2 or i - 3 <= j),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mask_mod_pattern(case):
    mask_mod, rule = CASES[case]
    np.testing.assert_array_equal(_visible(mask_mod), _expected(rule))


def test_document_mask_mod_equals_segment_ids_in_the_kernel():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((700, 2, 8)), jnp.float32) for _ in range(3))
    ids = jnp.asarray(np.repeat(np.arange(3), [200, 300, 200]))
    by_mod = ea.dot_product_attention(
        q, k, v, mask_mod=ea.document_mask_mod(ids), implementation="chunked"
    )
    by_ids = ea.dot_product_attention(
        q, k, v, query_segment_ids=ids, kv_segment_ids=ids, implementation="chunked"
    )
    np.testing.assert_allclose(by_mod, by_ids, atol=1e-5, rtol=1e-5)


def test_prefix_length_per_example_under_vmap():
    prefixes = jnp.array([2, 7])
    q = jnp.zeros((2, SEQ, 1, 4))

    def weights(q, prefix):
        return ea.dot_product_attention_weights(q, q, mask_mod=ea.prefix_lm_mask_mod(prefix))

    visible = np.asarray(jax.vmap(weights)(q, prefixes)[:, 0] > 0)
    for b, prefix in enumerate([2, 7]):
        rule = lambda i, j, p=prefix: j <= i or j < p  # noqa: E731
        np.testing.assert_array_equal(visible[b], _expected(rule))


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size must be positive, got chunk_size=0"):
        ea.chunked_mask_mod(0)


def test_document_mask_mod_shorter_than_the_positions_is_refused():
    """Ids shorter than the positions the mod sees would be clamped into a wrong mask."""
    ids = jnp.asarray(IDS[:8])
    q = jnp.zeros((SEQ, 1, 4))
    for call in (
        lambda mod: ea.dot_product_attention(q, q, q, mask_mod=mod),
        lambda mod: ea.dot_product_attention_weights(q, q, mask_mod=mod),
        lambda mod: ea.make_block_plan(SEQ, SEQ, mask_mod=mod),
        # Combined with others, the shortest array still decides.
        lambda mod: ea.dot_product_attention(
            q, q, q, mask_mod=ea.and_mask_mods(ea.prefix_lm_mask_mod(2), mod)
        ),
    ):
        with pytest.raises(ValueError, match="8 positions.* 12"):
            call(ea.document_mask_mod(ids))


def test_document_mask_mod_positions_of_a_cache():
    """Decoding: the queries sit after the cached tokens, at absolute positions."""
    ids = jnp.asarray(IDS)
    q, kv = jnp.zeros((2, 1, 4)), jnp.zeros((SEQ, 1, 4))
    mod = ea.document_mask_mod(ids)
    # Positions 10 and 11 are covered; 11 and 12 are not.
    ea.dot_product_attention(q, kv, kv, mask_mod=mod, query_offset=10, is_causal=True)
    with pytest.raises(ValueError, match="12 positions.* 13"):
        ea.dot_product_attention(q, kv, kv, mask_mod=mod, query_offset=11, is_causal=True)
    # Keys past the filled length are hidden, and so are the rows past the query length.
    short = ea.document_mask_mod(ids[:6])
    ea.dot_product_attention(
        q, kv, kv, mask_mod=short, query_offset=4, key_value_seq_length=6, is_causal=True
    )
    with pytest.raises(ValueError, match="6 positions.* 12"):
        ea.dot_product_attention(q, kv, kv, mask_mod=short, query_offset=4, is_causal=True)
    # Key positions given explicitly.
    positions = jnp.arange(SEQ, dtype=jnp.int32).at[3].set(20)
    with pytest.raises(ValueError, match="12 positions.* 21"):
        ea.dot_product_attention(q, kv, kv, mask_mod=mod, key_positions=positions)


def test_document_mask_mod_positions_under_jit():
    """A traced offset is checked at run time."""
    ids = jnp.asarray(IDS)
    q, kv = jnp.zeros((2, 1, 4)), jnp.zeros((SEQ, 1, 4))

    @jax.jit
    def step(offset):
        return ea.dot_product_attention(
            q, kv, kv, mask_mod=ea.document_mask_mod(ids), query_offset=offset, is_causal=True
        )

    jax.block_until_ready(step(10))
    with pytest.raises(Exception, match="12 positions"):
        jax.block_until_ready(step(11))


def test_document_mask_mod_positions_known_under_jit_add_no_run_time_check():
    """Inside `jit`, positions known when tracing (static shapes, no offset) are checked then:
    no run-time check is left in the program (a host callback, which a GPU kernel's lowering
    and every step would pay for)."""
    ids = jnp.asarray(IDS)
    q, kv = jnp.zeros((SEQ, 1, 4)), jnp.zeros((SEQ, 1, 4))

    def attend(q):
        return ea.dot_product_attention(q, kv, kv, mask_mod=ea.document_mask_mod(ids))

    assert "callback" not in str(jax.make_jaxpr(jax.jit(attend))(q))
    with pytest.raises(ValueError, match="positions"):
        jax.jit(lambda q: ea.dot_product_attention(
            q, kv, kv, mask_mod=ea.document_mask_mod(ids[:5])
        ))(q)  # fmt: skip

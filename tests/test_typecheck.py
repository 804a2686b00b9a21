"""Bad input fails early, at trace time, with an error naming the argument.

Shape and dtype mistakes are caught by the jaxtyping + beartype import hook (a
`jaxtyping.TypeCheckError` naming the parameter and showing the actual value); the rest are
`ValueError`s from the functions themselves, quoting what was given.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

import eqx_attention as ea


def _struct(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _zeros(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _type_error(parameter, actual):
    """`pytest.raises` for a type-check failure of `parameter` that shows `actual`."""
    pattern = rf"parameter '{parameter}'\.\nActual value: {re.escape(actual)}"
    return pytest.raises(TypeCheckError, match=pattern)


@pytest.mark.parametrize(
    "shapes, parameter, actual",
    [
        # A batch passed to the per-example API.
        (((2, 5, 4, 8), (5, 2, 8), (5, 2, 8)), "query", "f32[2,5,4,8]"),
        # qk_size 8 for the query, 6 for the key.
        (((5, 4, 8), (5, 2, 6), (5, 2, 8)), "key", "f32[5,2,6]"),
        # kv_seq 5 for the key, 6 for the value.
        (((5, 4, 8), (5, 2, 8), (6, 2, 8)), "value", "f32[6,2,8]"),
        # num_kv_heads 2 for the key, 1 for the value.
        (((5, 4, 8), (5, 2, 8), (5, 1, 8)), "value", "f32[5,1,8]"),
        # Heads folded into the feature axis.
        (((5, 32), (5, 2, 8), (5, 2, 8)), "query", "f32[5,32]"),
    ],
    ids=["batched_query", "qk_size", "kv_seq", "kv_heads", "rank_2_query"],
)
def test_shape_mistakes(shapes, parameter, actual):
    q, k, v = (_zeros(*s) for s in shapes)
    with _type_error(parameter, actual):
        ea.dot_product_attention(q, k, v)


@pytest.mark.parametrize(
    "options, parameter, actual",
    [
        ({"mask": _zeros(5, 7)}, "mask", "f32[5,7]"),
        ({"mask": _zeros(5, 6, dtype=bool)}, "mask", "bool[5,6]"),
        ({"mask": _zeros(3, 5, 7, dtype=bool)}, "mask", "bool[3,5,7]"),
        ({"bias": _zeros(4, 7, 7)}, "bias", "f32[4,7,7]"),
        ({"bias": _zeros(5, 7, dtype=jnp.int32)}, "bias", "i32[5,7]"),
        (
            {"query_segment_ids": _zeros(7, dtype=jnp.int32), "kv_segment_ids": None},
            "query_segment_ids",
            "i32[7]",
        ),
        (
            {"query_segment_ids": _zeros(5, dtype=jnp.int32), "kv_segment_ids": _zeros(7)},
            "kv_segment_ids",
            "f32[7]",
        ),
        ({"query_seq_length": 2.5}, "query_seq_length", "2.5"),
        ({"key_value_seq_length": _zeros(2, dtype=jnp.int32)}, "key_value_seq_length", "i32[2]"),
    ],
    ids=[
        "float_mask",
        "mask_kv_seq",
        "mask_heads",
        "bias_q_seq",
        "int_bias",
        "segment_length",
        "float_segments",
        "float_length",
        "batched_length",
    ],
)
def test_option_mistakes(options, parameter, actual):
    q, k, v = _zeros(5, 4, 8), _zeros(7, 2, 8), _zeros(7, 2, 8)
    with _type_error(parameter, actual):
        ea.dot_product_attention(q, k, v, **options)


def test_integer_query():
    q = _zeros(5, 4, 8, dtype=jnp.int32)
    with _type_error("query", "i32[5,4,8]"):
        ea.dot_product_attention(q, _zeros(5, 4, 8), _zeros(5, 4, 8))


def test_weights_shape_mistakes():
    with _type_error("key", "f32[7,2,6]"):
        ea.dot_product_attention_weights(_zeros(5, 4, 8), _zeros(7, 2, 6))
    with _type_error("mask", "f32[5,7]"):
        ea.dot_product_attention_weights(_zeros(5, 4, 8), _zeros(7, 2, 8), mask=_zeros(5, 7))


def test_mask_helper_mistakes():
    with _type_error("query_input", "f32[2,3]"):
        ea.make_attention_mask(_zeros(2, 3), _zeros(4))
    with _type_error("mask_kv", "bool[1,4]"):
        ea.cross_attention_mask(_zeros(3, dtype=bool), _zeros(1, 4, dtype=bool))


@pytest.mark.parametrize(
    "shapes, options, match",
    [
        (
            ((5, 4, 8), (5, 3, 8), (5, 3, 8)),
            {},
            r"num_heads=4 \(query\.shape\[1\]\) must be a multiple of num_kv_heads=3",
        ),
        (
            ((5, 4, 8), (5, 4, 8), (5, 4, 8)),
            {"dropout_p": 0.1},
            r"dropout_p=0\.1 > 0 needs a dropout_key, got None",
        ),
        (
            ((5, 4, 8), (5, 4, 8), (5, 4, 8)),
            {"query_segment_ids": _zeros(5, dtype=jnp.int32)},
            r"query_segment_ids and kv_segment_ids must be given together, got "
            r"query_segment_ids=array of shape \(5,\), kv_segment_ids=None",
        ),
        (
            ((5, 4, 8), (5, 4, 8), (5, 4, 8)),
            {"kv_segment_ids": _zeros(5, dtype=jnp.int32)},
            r"query_segment_ids=None, kv_segment_ids=array of shape \(5,\)",
        ),
        (
            ((5, 4, 8), (5, 4, 8), (5, 4, 8)),
            {"local_window_size": (2, -1)},
            r"local_window_size must be non-negative, got local_window_size=\(2, -1\)",
        ),
        (
            ((5, 4, 8), (5, 4, 8), (5, 4, 8)),
            {"logit_softcap": 0.0},
            r"logit_softcap must be positive, got logit_softcap=0\.0",
        ),
    ],
    ids=["heads", "dropout_key", "q_segments", "kv_segments", "window", "cap"],
)
def test_value_errors(shapes, options, match):
    q, k, v = (_zeros(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ea.dot_product_attention(q, k, v, **options)


def test_implementation_is_a_literal():
    """`implementation` is typed `Literal["xla", "chunked", "cudnn"] | None`: the hook names
    the parameter, the value given and the values allowed."""
    q = _zeros(5, 4, 8)
    pattern = (
        r"parameter 'implementation'\.\nActual value: 'flash'\n"
        r"Expected type: .*'xla', 'chunked', 'cudnn'"
    )
    with pytest.raises(TypeCheckError, match=pattern):
        ea.dot_product_attention(q, q, q, implementation="flash")


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_complex_inputs_are_refused(which):
    """Flax accepts complex inputs; we refuse them with a ValueError saying so, not with a
    type-check trace."""
    args = {"query": _zeros(5, 4, 8), "key": _zeros(5, 4, 8), "value": _zeros(5, 4, 8)}
    args[which] = args[which].astype(jnp.complex64)
    with pytest.raises(ValueError, match=rf"complex inputs are unsupported.*{which}=complex64"):
        ea.dot_product_attention(**args)
    if which != "value":
        with pytest.raises(ValueError, match="complex inputs are unsupported"):
            ea.dot_product_attention_weights(args["query"], args["key"])


def test_weights_value_errors():
    q, k = _zeros(5, 4, 8), _zeros(5, 3, 8)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        ea.dot_product_attention_weights(q, k)
    with pytest.raises(ValueError, match="must be given together"):
        ea.dot_product_attention_weights(
            q, _zeros(5, 4, 8), query_segment_ids=_zeros(5, dtype=jnp.int32)
        )


def test_checked_at_trace_time():
    """Under `jax.jit` the mistake surfaces while tracing abstract values, before any run."""
    traced = []

    @jax.jit
    def attend(q, k, v):
        traced.append(q.shape)
        return ea.dot_product_attention(q, k, v)

    # Shape-only stand-ins: no array exists, so only tracing can raise.
    with _type_error("key", "f32[7,2,6]"):
        attend.trace(_struct(5, 4, 8), _struct(7, 2, 6), _struct(7, 2, 8))
    assert traced == [(5, 4, 8)]
    with _type_error("query", "f32[2,5,4,8]"):
        jax.eval_shape(
            ea.dot_product_attention, _struct(2, 5, 4, 8), _struct(5, 2, 8), _struct(5, 2, 8)
        )
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        attend.trace(_struct(5, 4, 8), _struct(7, 3, 8), _struct(7, 3, 8))
    # A correct call traces to the documented output shape and the inputs' promoted dtype.
    out = jax.eval_shape(
        ea.dot_product_attention,
        _struct(5, 4, 8, dtype=jnp.bfloat16),
        _struct(7, 2, 8, dtype=jnp.bfloat16),
        _struct(7, 2, 3, dtype=jnp.bfloat16),
    )
    assert out == _struct(5, 4, 3, dtype=jnp.bfloat16)


def test_checked_inside_vmap():
    """vmap strips the batch axis before the check, so a batch of examples passes..."""
    q, k, v = _zeros(3, 5, 4, 8), _zeros(3, 7, 2, 8), _zeros(3, 7, 2, 8)
    out = jax.eval_shape(jax.vmap(ea.dot_product_attention), q, k, v)
    assert out.shape == (3, 5, 4, 8)
    # ...while a per-example mismatch is still seen on the mapped tracers.
    with _type_error("key", "f32[7,2,6]"):
        jax.eval_shape(jax.vmap(ea.dot_product_attention), q, _zeros(3, 7, 2, 6), v)

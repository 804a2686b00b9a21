"""The blockwise kernel's tiling, checked directly on its block ranges, and the automatic
choice between kernels."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eqx_attention import _kernels as kernels
from eqx_attention._kernels import choose_implementation
from eqx_attention._kernels._chunked import _split
from eqx_attention._spec import AttentionSpec

COARSE, FINE = 8, 4


@st.composite
def ranges(draw):
    """`lo <= inner_lo`, `inner_hi <= hi` (or an empty inner range), as the spec makes them."""
    lo = draw(st.integers(0, 40))
    hi = draw(st.integers(lo, 48))
    inner_lo = draw(st.integers(lo, hi))
    inner_hi = draw(st.integers(inner_lo, hi))
    return lo, hi, inner_lo, inner_hi


@settings(max_examples=200, deadline=None)
@given(ranges())
def test_split_covers_the_range_once_with_fine_steps_only_off_the_grid(r):
    lo, hi, inner_lo, inner_hi = r
    parts = [
        tuple(int(x) for x in part) for part in _split(lo, hi, inner_lo, inner_hi, COARSE, FINE)
    ]
    widths = (FINE, COARSE, COARSE, COARSE, FINE)
    covered = np.zeros(64, int)
    for (start, stop), width in zip(parts, widths, strict=True):
        for j in range(start, stop):
            covered[j * width : (j + 1) * width] += 1
    # Every key of [lo, hi) exactly once; beyond it, only the rest of a fine step.
    assert np.all(covered[lo:hi] == 1)
    assert np.all(covered <= 1)
    assert covered[: lo // FINE * FINE].sum() == 0
    assert covered[-(-hi // FINE) * FINE :].sum() == 0
    # Unmasked coarse blocks lie inside the inner range; fine steps never fill a whole
    # coarse block that the range covers (one coarse step is cheaper there).
    (i_lo, i_hi) = parts[2]
    if i_hi > i_lo:
        assert inner_lo <= i_lo * COARSE and i_hi * COARSE <= inner_hi
    for start, stop in (parts[0], parts[4]):
        fine_keys = set(range(start * FINE, stop * FINE))
        for block in range(64 // COARSE):
            keys = set(range(block * COARSE, (block + 1) * COARSE))
            assert not (keys <= fine_keys and lo <= block * COARSE and (block + 1) * COARSE <= hi)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN takes precedence on a GPU")
@pytest.mark.parametrize(
    "q_seq,kv_seq,expected",
    [
        (192, 192, "xla"),
        (192, 193, "chunked"),
        (4096, 4096, "chunked"),
        # Decoding steps over a long buffer take the blockwise loop, which reads only what
        # is filled, even where the logits would be few.
        (1, 2047, "xla"),
        (1, 2048, "chunked"),
        (16, 2048, "chunked"),
        (17, 2048, "xla"),
    ],
)
def test_automatic_choice_materialises_only_small_problems(q_seq, kv_seq, expected):
    spec = AttentionSpec(
        q_seq=q_seq, kv_seq=kv_seq, num_heads=2, num_kv_heads=2, scale=1.0, is_causal=True,
        window=None, logit_softcap=None, dropout_p=None, mask_mod=None, score_mod=None,
        mask=None, q_length=None, kv_length=None, q_segment_ids=None, kv_segment_ids=None,
        dropout_seed=None,
    )  # fmt: skip
    assert choose_implementation(spec, jnp.float32, None, 64, 64) == expected


def test_threshold_stated_in_the_guide_is_the_one_used():
    """The automatic rule's XLA-size threshold is stated for users in one place, the
    implementations guide; it must be the code's `XLA_MAX_LOGITS`."""
    guide = pathlib.Path(__file__).parents[1] / "docs" / "guides" / "implementations.md"
    stated = re.findall(r"at most (\d+) &times; (\d+) logits per head", guide.read_text())
    assert len(stated) == 1
    ((rows, cols),) = stated
    assert int(rows) * int(cols) == kernels.XLA_MAX_LOGITS
    decoding = re.findall(r"at most (\d+)\s+queries over at least (\d+) keys", guide.read_text())
    assert decoding == [(str(kernels.DECODE_MAX_Q), str(kernels.DECODE_MIN_KV))]

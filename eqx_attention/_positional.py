"""Positional encodings: rotary (RoPE) and the original Transformer's sinusoidal one."""

import dataclasses
import functools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._typing import ArrayOrNumPy

Positions = Int[ArrayOrNumPy, " seq"]


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation: every rotary frequency is divided by `factor`.

    Equivalent to feeding positions `p / factor`, so a model trained on `n` positions
    covers `factor * n`.
    """

    factor: float

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"factor must be positive, got factor={self.factor}")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1-style frequency scaling for long context.

    Frequencies whose wavelength is shorter than `original_max_position / high_freq_factor`
    are kept, those with wavelength longer than `original_max_position / low_freq_factor`
    are divided by `factor`, and the band in between is interpolated smoothly. The defaults
    are Llama 3.1's.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"factor must be positive, got factor={self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "need 0 < low_freq_factor < high_freq_factor, got "
                f"low_freq_factor={self.low_freq_factor}, "
                f"high_freq_factor={self.high_freq_factor}"
            )


RopeScaling = LinearRopeScaling | Llama3RopeScaling


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(
    rotary_size: int, theta: float, scaling: RopeScaling | None, float_dtype: np.dtype
) -> np.ndarray:
    """The `rotary_size // 2` angular frequencies, cached by everything that changes them.

    Computed in the default float dtype by the same formula as
    `equinox.nn.RotaryPositionalEmbedding`, so the unscaled embedding agrees with Equinox's
    bit for bit. (Equinox keys its table
    without `theta`; keying on all arguments here is what keeps two RoPEs apart.)
    """
    with jax.ensure_compile_time_eval():
        exponents = jnp.arange(0.0, rotary_size, 2) / rotary_size
        inv_freq = np.asarray(1.0 / (theta**exponents), dtype=float_dtype)
    if isinstance(scaling, LinearRopeScaling):
        inv_freq = (inv_freq / scaling.factor).astype(float_dtype)
    elif isinstance(scaling, Llama3RopeScaling):
        wavelength = 2 * math.pi / inv_freq.astype(np.float64)
        smooth = (scaling.original_max_position / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smooth = np.clip(smooth, 0.0, 1.0)
        # smooth == 0: long wavelengths, fully interpolated; smooth == 1: short ones, kept.
        scaled = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = scaled.astype(float_dtype)
    return inv_freq


def _default_positions(positions: ArrayOrNumPy | None, seq: int) -> Array:
    # The shape of given positions is checked against `x` by the jaxtyping annotations.
    return jnp.arange(seq, dtype=jnp.int32) if positions is None else jnp.asarray(positions)


def _promoted(x: Array, table_dtype) -> np.dtype:
    """The dtype `x` and a table promote to, found explicitly, so that the layer computes
    the same under `jax.numpy_dtype_promotion("strict")` and then casts back to `x`'s."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(x.dtype, table_dtype)


class RotaryPositionalEmbedding(eqx.Module):
    """Rotary positional embedding (RoPE), as in RoFormer.

    Pairs of channels are rotated by an angle proportional to the token's position, so the
    dot product of a rotated query and key depends only on their relative position. With the
    default arguments this is numerically equal to `equinox.nn.RotaryPositionalEmbedding`
    (split-half pairing: channel `i` pairs with `i + rotary_size // 2`).

    Options beyond Equinox's:

    - `interleaved=True`: GPT-J / original-RoFormer pairing of channels `(2i, 2i + 1)`.
    - `rotary_size`: rotate only the first `rotary_size` channels and pass the rest through
      (GPT-NeoX/Phi "partial rotary": `rotary_size = int(fraction * embedding_size)`).
    - `scaling`: frequency scaling for long context, a [`eqx_attention.LinearRopeScaling`][]
      or a [`eqx_attention.Llama3RopeScaling`][].

    Apply it per head, e.g. `jax.vmap(rope, in_axes=1, out_axes=1)(heads)` for heads of
    shape `(seq, num_heads, size)`, or pass it as `rope=` to
    [`eqx_attention.MultiheadAttention`][], which also gets the positions right when
    decoding from a KV cache.

    ```python
    rope = eqx_attention.RotaryPositionalEmbedding(64)
    x = jnp.ones((10, 64))
    y = rope(x)  # positions 0..9
    y_later = rope(x, positions=jnp.arange(100, 110))
    ```
    """

    embedding_size: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    interleaved: bool = eqx.field(static=True)
    rotary_size: int = eqx.field(static=True)
    scaling: RopeScaling | None = eqx.field(static=True)
    # No `dtype` given: the rotation follows the input's dtype, also under strict promotion.
    follows_input: bool = eqx.field(static=True)

    def __init__(
        self,
        embedding_size: int,
        theta: float = 10000.0,
        dtype: Any = None,
        *,
        interleaved: bool = False,
        rotary_size: int | None = None,
        scaling: RopeScaling | None = None,
    ):
        """**Arguments:**

        - `embedding_size`: size of each vector rotated (per head: the head size).
        - `theta`: base of the geometric sequence of wavelengths; larger is slower.
        - `dtype`: dtype of the sine/cosine tables; defaults to float32 (float64 in 64-bit
          mode), as in Equinox. Without it the layer follows its input's dtype: it computes
          in the dtype the input and the tables promote to and casts back, explicitly, so a
          bfloat16 input also works under `jax.numpy_dtype_promotion("strict")`. With it,
          as in Equinox, a table of another dtype than the input is a promotion the caller
          must allow (strict promotion refuses it).
        - `interleaved`: pair channels `(2i, 2i + 1)` instead of `(i, i + rotary_size // 2)`.
        - `rotary_size`: number of leading channels to rotate; defaults to all of them. Must
          be even.
        - `scaling`: optional long-context frequency scaling.
        """
        rotary_size = embedding_size if rotary_size is None else rotary_size
        if embedding_size < 0 or rotary_size % 2:
            raise ValueError(
                "the rotated size must be non-negative and even, got "
                f"embedding_size={embedding_size}, rotary_size={rotary_size}"
            )
        if not 0 <= rotary_size <= embedding_size:
            raise ValueError(
                f"rotary_size must be in [0, embedding_size={embedding_size}], "
                f"got rotary_size={rotary_size}"
            )
        if theta <= 0:
            raise ValueError(f"theta must be positive, got theta={theta}")
        self.embedding_size = embedding_size
        self.theta = float(theta)
        self.dtype = _default_float() if dtype is None else jnp.dtype(dtype)
        self.follows_input = dtype is None
        self.interleaved = interleaved
        self.rotary_size = rotary_size
        self.scaling = scaling

    def __call__(
        self,
        x: Float[ArrayOrNumPy, "seq embedding_size"],
        *,
        positions: Positions | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq embedding_size"]:
        """**Arguments:**

        - `x`: array of shape `(seq, embedding_size)` (a jax or NumPy array).
        - `positions`: integer position of each row, shape `(seq,)`; defaults to
          `arange(seq)`. May be a traced array (e.g. a cache offset plus `arange`).
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        Array of the shape and dtype of `x`, the first `rotary_size` channels rotated, computed
        in the dtype `x` and the tables promote to (see `dtype`).
        """
        x = jnp.asarray(x)
        seq, size = x.shape
        if size != self.embedding_size:
            raise ValueError(
                f"x.shape[-1] must equal embedding_size={self.embedding_size}, got {size}"
            )
        positions = _default_positions(positions, seq)
        if self.rotary_size == 0:
            return x
        inv_freq = jnp.asarray(
            _inverse_frequencies(self.rotary_size, self.theta, self.scaling, _default_float())
        )
        angles = positions.astype(inv_freq.dtype)[:, None] * inv_freq[None, :]
        # Rounded to the tables' dtype first, as they are stored, then computed with `x`:
        # in the dtype both promote to, cast explicitly when the layer follows its input,
        # else by the caller's promotion rules (as Equinox).
        cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
        rot, rest = x[:, : self.rotary_size], x[:, self.rotary_size :]
        if self.follows_input:
            compute = _promoted(x, self.dtype)
            cos, sin, rot = cos.astype(compute), sin.astype(compute), rot.astype(compute)
        if self.interleaved:
            # Channels (2i, 2i+1) rotate together: the partner of an even channel is the
            # next one, negated; of an odd channel the previous one.
            pairs = rot.reshape(seq, -1, 2)
            partner = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(seq, -1)
            cos, sin = jnp.repeat(cos, 2, axis=1), jnp.repeat(sin, 2, axis=1)
        else:
            half = self.rotary_size // 2
            partner = jnp.concatenate([-rot[:, half:], rot[:, :half]], axis=1)
            cos, sin = jnp.tile(cos, (1, 2)), jnp.tile(sin, (1, 2))
        rotated = (rot * cos + partner * sin).astype(x.dtype)
        return jnp.concatenate([rotated, rest], axis=1) if rest.shape[1] else rotated


class SinusoidalPositionalEmbedding(eqx.Module):
    """The fixed sinusoidal encoding of "Attention Is All You Need", added to the input.

    Channel `2i` of position `p` gets `sin(p / max_timescale**(2i / embedding_size))` and
    channel `2i + 1` the cosine of the same angle.

    ```python
    seq = 10
    token_embeddings = jax.random.normal(jax.random.key(0), (seq, 512))
    pos = eqx_attention.SinusoidalPositionalEmbedding(512)
    x = pos(token_embeddings)  # (seq, 512) -> (seq, 512)
    table = pos.encoding(jnp.arange(seq))  # the encoding alone
    ```
    """

    embedding_size: int = eqx.field(static=True)
    max_timescale: float = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    def __init__(self, embedding_size: int, max_timescale: float = 10000.0, dtype: Any = None):
        """**Arguments:**

        - `embedding_size`: number of channels; must be even.
        - `max_timescale`: the longest wavelength is `2 pi max_timescale` (the paper's 10000).
        - `dtype`: dtype the encoding is computed in; defaults to float32 (float64 in 64-bit
          mode).
        """
        if embedding_size <= 0 or embedding_size % 2:
            raise ValueError(
                f"embedding_size must be positive and even, got embedding_size={embedding_size}"
            )
        if max_timescale <= 0:
            raise ValueError(f"max_timescale must be positive, got max_timescale={max_timescale}")
        self.embedding_size = embedding_size
        self.max_timescale = float(max_timescale)
        self.dtype = _default_float() if dtype is None else jnp.dtype(dtype)

    def encoding(self, positions: Positions) -> Float[Array, "seq embedding_size"]:
        """**Arguments:**

        - `positions`: integer positions, shape `(seq,)`.

        **Returns:**

        The encoding, shape `(seq, embedding_size)`, in `dtype`.
        """
        positions = jnp.asarray(positions)
        exponents = np.arange(0, self.embedding_size, 2) / self.embedding_size
        inv_freq = jnp.asarray(self.max_timescale**-exponents, dtype=self.dtype)
        angles = positions.astype(self.dtype)[:, None] * inv_freq[None, :]
        return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
            positions.shape[0], self.embedding_size
        )

    def __call__(
        self,
        x: Float[ArrayOrNumPy, "seq embedding_size"],
        *,
        positions: Positions | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq embedding_size"]:
        """**Arguments:**

        - `x`: array of shape `(seq, embedding_size)` (a jax or NumPy array).
        - `positions`: integer position of each row, shape `(seq,)`; defaults to
          `arange(seq)`.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        `x` plus the encoding, in the dtype of `x` (added in the dtype `x` and `dtype`
        promote to, cast explicitly, so this also runs under strict promotion).
        """
        x = jnp.asarray(x)
        seq, size = x.shape
        if size != self.embedding_size:
            raise ValueError(
                f"x.shape[-1] must equal embedding_size={self.embedding_size}, got {size}"
            )
        positions = _default_positions(positions, seq)
        compute = _promoted(x, self.dtype)
        return (x.astype(compute) + self.encoding(positions).astype(compute)).astype(x.dtype)


def _default_float() -> np.dtype:
    # float32, or float64 in 64-bit mode, without creating an array.
    return jax.dtypes.canonicalize_dtype(jnp.float64)

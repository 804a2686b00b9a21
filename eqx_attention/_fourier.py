"""Fourier features of positions on a multi-dimensional grid, as in Perceiver IO."""

import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


class FourierPositionEncoding(eqx.Module):
    r"""Fourier features of the positions of a `d`-dimensional grid (Perceiver IO).

    Each axis of length `n` gets coordinates `linspace(lower, upper, n)` and `num_bands`
    frequencies `linspace(1, max_resolution / 2, num_bands)`; the features of a position with
    coordinates $x \in \mathbb{R}^d$ are $\sin(\pi f x)$ and $\cos(\pi f x)$ for every axis and
    band, optionally preceded by $x$ itself. The channel count is therefore

    - `d * (2 * num_bands + 1)` by default,
    - `d * 2 * num_bands` with `concat_positions=False`,
    - `d * (num_bands + 1)` with `sine_only=True`, and `d * num_bands` with both.

    Positions are flat (row-major) indices into `index_shape`. Evaluating a subset of
    positions looks the coordinates up on the same grid as the full evaluation, so
    `enc(positions)` equals `enc()[positions]`.

    ```python
    enc = eqx_attention.FourierPositionEncoding((8, 8), num_bands=4)
    enc().shape                       # (64, 18)
    enc(jnp.array([0, 9])).shape      # (2, 18): the features of pixels (0, 0) and (1, 1)
    ```
    """

    index_shape: tuple[int, ...] = eqx.field(static=True)
    num_bands: int = eqx.field(static=True)
    max_resolution: tuple[float, ...] = eqx.field(static=True)
    concat_positions: bool = eqx.field(static=True)
    sine_only: bool = eqx.field(static=True)
    bounds: tuple[float, float] = eqx.field(static=True)

    def __init__(
        self,
        index_shape: tuple[int, ...],
        num_bands: int,
        bounds: tuple[float | int, float | int] = (-1.0, 1.0),
        concat_positions: bool = True,
        sine_only: bool = False,
        *,
        max_resolution: tuple[float | int, ...] | None = None,
    ):
        """The positional arguments are flax-extra's (`seqshape, n_bands,
        spatial_coordinate_bounds, use_spatial_coordinates, use_sine_only`), in its order;
        `max_resolution`, which flax-extra does not have, is keyword only.

        **Arguments:**

        - `index_shape`: shape of the grid, e.g. `(height, width)` or `(time,)`.
        - `num_bands`: number of frequency bands per axis.
        - `bounds`: `(lower, upper)` coordinates of the first and last grid point of every axis.
        - `concat_positions`: put the raw coordinates in front of the Fourier features.
        - `sine_only`: use only the sine features.
        - `max_resolution`: per-axis resolution whose Nyquist frequency is the highest band;
          defaults to `index_shape`. (Keyword only.)
        """
        index_shape = tuple(int(n) for n in index_shape)
        if not index_shape or min(index_shape) < 1:
            raise ValueError(f"index_shape must be non-empty and positive, got {index_shape}")
        if num_bands < 1:
            raise ValueError(f"num_bands must be at least 1, got num_bands={num_bands}")
        if max_resolution is None:
            max_resolution = index_shape
        if len(max_resolution) != len(index_shape):
            raise ValueError(
                f"max_resolution must have one entry per axis of index_shape={index_shape}, "
                f"got max_resolution={max_resolution}"
            )
        lower, upper = bounds
        if not lower < upper:
            raise ValueError(f"bounds must be (lower, upper) with lower < upper, got {bounds}")
        self.index_shape = index_shape
        self.num_bands = num_bands
        self.max_resolution = tuple(float(r) for r in max_resolution)
        self.concat_positions = concat_positions
        self.sine_only = sine_only
        self.bounds = (float(lower), float(upper))

    @property
    def num_positions(self) -> int:
        """Number of grid positions, `prod(index_shape)`."""
        return math.prod(self.index_shape)

    @property
    def num_channels(self) -> int:
        """Number of features per position."""
        d = len(self.index_shape)
        phases = 1 if self.sine_only else 2
        return d * self.num_bands * phases + (d if self.concat_positions else 0)

    def __call__(
        self, positions: Int[Array, " n"] | None = None, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "n channels"]:
        """**Arguments:**

        - `positions`: optional flat indices into `index_shape` (each in
          `[0, num_positions)`); defaults to every position in row-major order.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        Array of shape `(n, num_channels)`, `n = len(positions)` or `num_positions`.
        """
        if positions is None:
            positions = jnp.arange(self.num_positions)
        lower, upper = self.bounds
        axis_indices = jnp.unravel_index(positions, self.index_shape)
        # Index the full-grid coordinates rather than recomputing them from the indices, so
        # that a subset can never land on a different grid than the whole.
        coords = jnp.stack(
            [
                jnp.linspace(lower, upper, n)[idx]
                for n, idx in zip(self.index_shape, axis_indices, strict=True)
            ],
            axis=-1,
        )
        freqs = jnp.stack([jnp.linspace(1.0, r / 2, self.num_bands) for r in self.max_resolution])
        phases = jnp.pi * (coords[:, :, None] * freqs[None]).reshape(coords.shape[0], -1)
        features = [jnp.sin(phases)] if self.sine_only else [jnp.sin(phases), jnp.cos(phases)]
        if self.concat_positions:
            features = [coords, *features]
        return jnp.concatenate(features, axis=-1)

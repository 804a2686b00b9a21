"""Turning raw inputs into token sequences and back, for one modality or several."""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._trainable import TrainablePositionalMasking, TrainablePositionalPadding

Positions = Int[Array, " n"]


def _concatenate(x: Array, y: Array) -> Array:
    return jnp.concatenate([x, y], axis=-1)


class Encoding(eqx.Module):
    """Preprocesses an input into a `(seq, channels)` sequence and adds position information.

    The preprocessed input is flattened to `(seq, d)` (all leading axes become the sequence)
    and aggregated with the positional encoding, by concatenation unless `aggregation` says
    otherwise.

    ```python
    image = jnp.ones((8, 8, 1))
    fourier = eqx_attention.FourierPositionEncoding((8, 8), num_bands=4)
    enc = eqx_attention.Encoding(positional_encoding=fourier)
    enc(image).shape   # (64, 19): the pixel value and 18 Fourier features
    ```
    """

    preprocessing: Callable[[Array], Array] | None
    positional_encoding: Callable[[Positions | None], Array] | None
    aggregation: Callable[[Array, Array], Array]

    def __init__(
        self,
        preprocessing: Callable[[Array], Array] | None = None,
        positional_encoding: Callable[[Positions | None], Array] | None = None,
        aggregation: Callable[[Array, Array], Array] = _concatenate,
    ):
        """**Arguments:**

        - `preprocessing`: optional module or function applied to the whole input first (an
          embedding, a patch extractor, ...); its output's last axis is the channel axis.
        - `positional_encoding`: optional module called with the `positions` argument of
          `__call__`, e.g. [`eqx_attention.FourierPositionEncoding`][] or
          [`eqx_attention.TrainablePositionalEncoding`][].
        - `aggregation`: how to combine the sequence with the positional encoding; defaults
          to concatenating the channels. Pass `jnp.add` to add them.
        """
        self.preprocessing = preprocessing
        self.positional_encoding = positional_encoding
        self.aggregation = aggregation

    def __call__(
        self, inputs: Array, positions: Positions | None = None, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq d"]:
        """**Arguments:**

        - `inputs`: the raw input of one example.
        - `positions`: when `inputs` holds only some positions of the full grid, their
          indices, so the positional encoding is evaluated there; one per sequence element.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        Array of shape `(seq, channels)`.
        """
        x = inputs if self.preprocessing is None else self.preprocessing(inputs)
        x = x.reshape(-1, x.shape[-1])
        if self.positional_encoding is None:
            if positions is not None:
                raise ValueError(
                    "positions were given but this Encoding has no positional_encoding"
                )
            return x
        return self.aggregation(x, self.positional_encoding(positions).astype(x.dtype))


class Decoding(eqx.Module):
    """Decodes every position of a sequence, then postprocesses the whole sequence.

    ```python
    linear = eqx.nn.Linear(64, 3, key=jax.random.key(0))
    dec = eqx_attention.Decoding(linear, lambda y: y.reshape(8, 8, 3))
    dec(jnp.ones((64, 64))).shape   # (8, 8, 3)
    ```
    """

    embedding_decoding: Callable[[Array], Array] | None
    postprocessing: Callable[[Array], Array] | None

    def __init__(
        self,
        embedding_decoding: Callable[[Array], Array] | None = None,
        postprocessing: Callable[[Array], Array] | None = None,
    ):
        """**Arguments:**

        - `embedding_decoding`: optional module applied to each position's vector, e.g. an
          `equinox.nn.Linear` or an [`eqx_attention.EmbedDecoding`][].
        - `postprocessing`: optional module or function applied to the whole decoded
          sequence, e.g. a reshape back to an image.
        """
        self.embedding_decoding = embedding_decoding
        self.postprocessing = postprocessing

    def __call__(
        self, outputs: Float[Array, "seq size"], *, key: PRNGKeyArray | None = None
    ) -> Array:
        """**Arguments:**

        - `outputs`: model outputs of shape `(seq, size)`.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        The decoded outputs; their shape is whatever the two steps make of them.
        """
        y = (
            outputs
            if self.embedding_decoding is None
            else jax.vmap(self.embedding_decoding)(outputs)
        )
        return y if self.postprocessing is None else self.postprocessing(y)


class EmbedDecoding(eqx.Module):
    """Projects vectors back onto a vocabulary with the transpose of an embedding matrix, plus
    a learned bias (tied input and output embeddings).

    To tie the weights for training, share the array with `equinox.nn.Shared`:

    ```python
    embed = eqx.nn.Embedding(100, 32, key=jax.random.key(0))
    shared = eqx.nn.Shared(
        (embed, eqx_attention.EmbedDecoding(embed.weight)),
        where=lambda pair: pair[1].embedding,
        get=lambda pair: pair[0].weight,
    )
    embed, decode = shared()   # decode.embedding is embed.weight, gradients add up
    ```
    """

    embedding: Float[Array, "vocab size"]
    bias: Float[Array, " vocab"]

    def __init__(self, embedding: Float[Array, "vocab size"]):
        """**Arguments:**

        - `embedding`: the `(vocab, size)` embedding matrix of the input encoder; the bias
          is initialised to zeros in its dtype.
        """
        self.embedding = embedding
        self.bias = jnp.zeros(embedding.shape[0], embedding.dtype)

    def __call__(
        self, x: Float[Array, "*positions size"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*positions vocab"]:
        """**Arguments:**

        - `x`: one vector `(size,)` or an array of them.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        Logits over the vocabulary, `(*positions, vocab)`.
        """
        return x @ self.embedding.T + self.bias


def _paddings(
    widths: Sequence[int], d_reserved: int, dtype: Any, key: PRNGKeyArray
) -> tuple[TrainablePositionalPadding, ...]:
    """One learned padding per modality, up to the widest modality plus `d_reserved`."""
    if d_reserved < 0:
        raise ValueError(f"d_reserved must be non-negative, got d_reserved={d_reserved}")
    d_max = max(widths) + d_reserved
    keys = jax.random.split(key, len(widths))
    return tuple(
        TrainablePositionalPadding(w, d_max, dtype, key=k)
        for w, k in zip(widths, keys, strict=True)
    )


def _check_count(what: str, values: Sequence[Any], num_modalities: int) -> None:
    if len(values) != num_modalities:
        raise ValueError(f"expected {num_modalities} {what}, one per modality, got {len(values)}")


def _concatenate_modalities(parts: Sequence[Array]) -> tuple[Array, tuple[int, ...]]:
    return jnp.concatenate(parts, axis=0), tuple(x.shape[0] for x in parts)


class MultimodalPositionalEncoding(eqx.Module):
    """Positional encodings of several modalities in one sequence.

    Each modality's encoding is padded with its own learned vector to a shared width (the
    widest plus `d_reserved` channels, so modalities stay distinguishable), and the results
    are concatenated along the sequence.
    """

    modalities: tuple[Callable[[Positions | None], Array], ...]
    paddings: tuple[TrainablePositionalPadding, ...]

    def __init__(
        self,
        modalities: Sequence[Callable[[Positions | None], Array]],
        d_reserved: int = 1,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `modalities`: one positional encoding per modality, each called with optional
          positions and returning `(seq_i, channels_i)`.
        - `d_reserved`: extra channels beyond the widest modality.
        - `dtype`: parameter dtype of the paddings.
        - `key`: PRNG key for the paddings.
        """
        widths = [jax.eval_shape(m).shape[-1] for m in modalities]
        self.modalities = tuple(modalities)
        self.paddings = _paddings(widths, d_reserved, dtype, key)

    def __call__(
        self,
        positions: Sequence[Positions | None] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "seq channels"], tuple[int, ...]]:
        """**Arguments:**

        - `positions`: optional per-modality position subsets (`None` entries mean all).
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        The concatenated `(sum(seq_i), channels)` encodings and the lengths `seq_i`.
        """
        if positions is None:
            positions = [None] * len(self.modalities)
        _check_count("position subsets", positions, len(self.modalities))
        parts = [
            pad(m(p)) for m, pad, p in zip(self.modalities, self.paddings, positions, strict=True)
        ]
        return _concatenate_modalities(parts)


class MultimodalEncoding(eqx.Module):
    """Encodes several modalities into one sequence.

    Each modality goes through its own encoder (e.g. an [`eqx_attention.Encoding`][]), is
    padded with a learned vector to a shared width (the widest plus `d_reserved` channels),
    optionally corrupted by a [`eqx_attention.TrainablePositionalMasking`][], and the results
    are concatenated along the sequence. The lengths that come back let
    [`eqx_attention.MultimodalDecoding`][] split the sequence again.
    """

    modalities: tuple[Callable[..., Array], ...]
    paddings: tuple[TrainablePositionalPadding, ...]
    maskings: tuple[TrainablePositionalMasking | None, ...]

    def __init__(
        self,
        modalities: Sequence[Callable[..., Array]],
        input_shapes: Sequence[tuple[int, ...] | jax.ShapeDtypeStruct],
        mask_rates: Sequence[float | None] | None = None,
        d_reserved: int = 1,
        inference: bool = False,
        dtype: Any = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `modalities`: one encoder per modality, called as `encoder(inputs, positions)`.
        - `input_shapes`: the shape of one example of each modality (float32 is assumed) or a
          `jax.ShapeDtypeStruct`; used to find each encoder's output width.
        - `mask_rates`: optional per-modality masking probability (`None` entries: no
          masking).
        - `d_reserved`: extra channels beyond the widest modality.
        - `inference`: initial `inference` flag of the maskings.
        - `dtype`: parameter dtype of the paddings and mask tokens.
        - `key`: PRNG key for the initialisation.
        """
        num = len(modalities)
        _check_count("input shapes", input_shapes, num)
        if mask_rates is None:
            mask_rates = [None] * num
        _check_count("mask rates", mask_rates, num)
        structs = [
            s if isinstance(s, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(s, jnp.float32)
            for s in input_shapes
        ]
        widths = [jax.eval_shape(m, s).shape[-1] for m, s in zip(modalities, structs, strict=True)]
        pad_key, mask_key = jax.random.split(key)
        self.modalities = tuple(modalities)
        self.paddings = _paddings(widths, d_reserved, dtype, pad_key)
        d_max = max(widths) + d_reserved
        self.maskings = tuple(
            None
            if rate is None
            else TrainablePositionalMasking(d_max, rate, inference, dtype, key=k)
            for rate, k in zip(mask_rates, jax.random.split(mask_key, num), strict=True)
        )

    def __call__(
        self,
        inputs: Sequence[Array],
        positions: Sequence[Positions | None] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, "seq channels"], tuple[int, ...]]:
        """**Arguments:**

        - `inputs`: one example of each modality.
        - `positions`: optional per-modality position subsets, passed to the encoders.
        - `key`: PRNG key for the maskings; needed when any of them is active.
        - `inference`: overrides the maskings' `inference` flag.

        **Returns:**

        The concatenated `(sum(seq_i), channels)` encodings and the lengths `seq_i`.
        """
        num = len(self.modalities)
        _check_count("inputs", inputs, num)
        if positions is None:
            positions = [None] * num
        _check_count("position subsets", positions, num)
        keys = [None] * num if key is None else list(jax.random.split(key, num))
        parts = []
        for i in range(num):
            x = self.paddings[i](self.modalities[i](inputs[i], positions[i]))
            if self.maskings[i] is not None:
                x = self.maskings[i](x, key=keys[i], inference=inference)
            parts.append(x)
        return _concatenate_modalities(parts)


class MultimodalDecoding(eqx.Module):
    """Splits a multimodal sequence back into its modalities and decodes each.

    The inverse of [`eqx_attention.MultimodalEncoding`][]: an optional shared
    `embedding_decoding` is applied to every position, then the sequence is cut at the
    given lengths and each piece goes through its modality's decoder (e.g. an
    [`eqx_attention.Decoding`][]).
    """

    modalities: tuple[Callable[[Array], Array], ...]
    embedding_decoding: Callable[[Array], Array] | None

    def __init__(
        self,
        modalities: Sequence[Callable[[Array], Array]],
        embedding_decoding: Callable[[Array], Array] | None = None,
    ):
        """**Arguments:**

        - `modalities`: one decoder per modality, each taking its `(seq_i, size)` slice.
        - `embedding_decoding`: optional module applied to each position first.
        """
        self.modalities = tuple(modalities)
        self.embedding_decoding = embedding_decoding

    def __call__(
        self,
        outputs: Float[Array, "seq size"],
        lengths: Sequence[int],
        *,
        key: PRNGKeyArray | None = None,
    ) -> list[Array]:
        """**Arguments:**

        - `outputs`: the multimodal sequence, `(seq, size)`.
        - `lengths`: the length of each modality's part, summing to `seq`.
        - `key`: ignored; accepted, as by every Equinox layer, so that the layer composes in
          `eqx.nn.Sequential`. (Keyword only.)

        **Returns:**

        A list with each modality's decoded output.
        """
        _check_count("lengths", lengths, len(self.modalities))
        if sum(lengths) != outputs.shape[0]:
            raise ValueError(
                f"lengths={tuple(lengths)} must sum to the sequence length {outputs.shape[0]}"
            )
        if self.embedding_decoding is not None:
            outputs = jax.vmap(self.embedding_decoding)(outputs)
        parts = jnp.split(outputs, np.cumsum(lengths)[:-1])
        return [decode(part) for decode, part in zip(self.modalities, parts, strict=True)]

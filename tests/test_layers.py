"""The flax-extra layer family: encodings, padding/masking, FeedForward, LSTM, attention
configurations, Encoding/Decoding and the multimodal pieces."""

import io
import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import eqx_attention as ea

TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# FourierPositionEncoding


def _fourier_reference(index_shape, num_bands, max_resolution, concat, sine_only, bounds):
    """Independent numpy version: meshgrid coordinates, per-axis bands, [x, sin, cos]."""
    axes = [np.linspace(bounds[0], bounds[1], n) for n in index_shape]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(index_shape))
    freqs = np.stack([np.linspace(1.0, r / 2, num_bands) for r in max_resolution])
    phases = np.pi * np.einsum("nd,dk->ndk", coords, freqs).reshape(len(coords), -1)
    parts = [np.sin(phases)] if sine_only else [np.sin(phases), np.cos(phases)]
    return np.concatenate(([coords] if concat else []) + parts, axis=-1)


@pytest.mark.parametrize("index_shape", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("sine_only", [True, False])
def test_fourier_matches_reference_and_channel_count(index_shape, concat, sine_only):
    num_bands = 3
    enc = ea.FourierPositionEncoding(
        index_shape, num_bands, concat_positions=concat, sine_only=sine_only, bounds=(-2, 1)
    )
    d = len(index_shape)
    expected_channels = d * num_bands * (1 if sine_only else 2) + (d if concat else 0)
    out = enc()
    assert enc.num_channels == expected_channels
    assert out.shape == (math.prod(index_shape), expected_channels)
    ref = _fourier_reference(index_shape, num_bands, index_shape, concat, sine_only, (-2, 1))
    np.testing.assert_allclose(out, ref, **TOL)


def test_fourier_max_resolution_sets_highest_band():
    enc = ea.FourierPositionEncoding((4, 6), 5, max_resolution=(20, 10), concat_positions=False)
    ref = _fourier_reference((4, 6), 5, (20, 10), False, False, (-1, 1))
    np.testing.assert_allclose(enc(), ref, **TOL)


@pytest.mark.parametrize("index_shape", [(9,), (3, 5), (4, 1, 6)])
def test_fourier_subset_uses_the_full_grid(index_shape, getkey):
    enc = ea.FourierPositionEncoding(index_shape, 4)
    positions = jax.random.randint(getkey(), (11,), 0, enc.num_positions)
    # Exactly equal: the subset indexes the same coordinate arrays as the full evaluation.
    np.testing.assert_array_equal(enc(positions), enc()[positions])


def test_fourier_validation():
    with pytest.raises(ValueError, match="num_bands"):
        ea.FourierPositionEncoding((4,), 0)
    with pytest.raises(ValueError, match="max_resolution"):
        ea.FourierPositionEncoding((4, 4), 2, max_resolution=(4,))
    with pytest.raises(ValueError, match="bounds"):
        ea.FourierPositionEncoding((4,), 2, bounds=(1, -1))


# ------------------------------------------------------------------------------------------
# Trainable encodings, padding, masking


def test_trainable_positional_encoding(getkey):
    enc = ea.TrainablePositionalEncoding(10, 6, key=getkey())
    assert enc().shape == (10, 6)
    positions = jnp.array([7, 0, 7])
    np.testing.assert_array_equal(enc(positions), enc.weight[positions])
    assert 0 < float(jnp.std(enc.weight)) < 0.05


def test_trainable_positional_padding(getkey):
    pad = ea.TrainablePositionalPadding(3, 8, key=getkey())
    x = jax.random.normal(getkey(), (5, 3))
    y = pad(x)
    assert y.shape == (5, 8)
    np.testing.assert_array_equal(y[:, :3], x)
    np.testing.assert_array_equal(y[:, 3:], jnp.broadcast_to(pad.padding, (5, 5)))
    assert ea.TrainablePositionalPadding(3, 3, key=getkey())(x).shape == (5, 3)
    with pytest.raises(ValueError, match="d_max=2 must be at least size=3"):
        ea.TrainablePositionalPadding(3, 2, key=getkey())


def test_trainable_positional_masking(getkey):
    x = jax.random.normal(getkey(), (200, 4))
    masking = ea.TrainablePositionalMasking(4, 0.3, key=getkey())
    y = masking(x, key=getkey())
    masked = jnp.all(y == masking.mask_token, axis=-1)
    np.testing.assert_array_equal(y[~masked], x[~masked])
    assert 30 < int(masked.sum()) < 90  # Binomial(200, 0.3): mean 60, sd 6.5
    everything = ea.TrainablePositionalMasking(4, 1.0, key=getkey())
    np.testing.assert_array_equal(
        everything(x, key=getkey()), jnp.broadcast_to(everything.mask_token, x.shape)
    )


def test_trainable_positional_masking_is_identity_in_inference(getkey):
    x = jax.random.normal(getkey(), (6, 4))
    masking = ea.TrainablePositionalMasking(4, 0.9, key=getkey())
    np.testing.assert_array_equal(masking(x, inference=True), x)
    np.testing.assert_array_equal(eqx.nn.inference_mode(masking)(x), x)
    np.testing.assert_array_equal(ea.TrainablePositionalMasking(4, 0.0, key=getkey())(x), x)
    with pytest.raises(ValueError, match="needs a key"):
        masking(x)
    with pytest.raises(ValueError, match="rate"):
        ea.TrainablePositionalMasking(4, 1.5, key=getkey())


# ------------------------------------------------------------------------------------------
# FeedForward, LSTM


def test_feedforward(getkey):
    ff = ea.FeedForward(6, widening_factor=3, key=getkey())
    assert ff.hidden.weight.shape == (18, 6)
    x = jax.random.normal(getkey(), (2, 5, 6))
    h = jax.nn.gelu(x @ ff.hidden.weight.T + ff.hidden.bias)
    np.testing.assert_allclose(ff(x), h @ ff.output.weight.T + ff.output.bias, **TOL)
    np.testing.assert_allclose(ff(x[0, 0]), ff(x)[0, 0], **TOL)
    relu = ea.FeedForward(6, activation=jax.nn.relu, key=getkey())
    assert relu.hidden.weight.shape == (6, 6)


def test_lstm_cell_matches_flax(getkey):
    cell = ea.LSTMCell(3, 5, key=getkey())
    cell = eqx.tree_at(lambda c: c.bias, cell, jax.random.normal(getkey(), (4, 5)))
    params = {}
    for g, name in enumerate("ifgo"):
        params["i" + name] = {"kernel": cell.input_kernel[:, g]}
        params["h" + name] = {"kernel": cell.recurrent_kernel[:, g], "bias": cell.bias[g]}
    carry = (jax.random.normal(getkey(), (5,)), jax.random.normal(getkey(), (5,)))
    x = jax.random.normal(getkey(), (3,))
    (c_ref, h_ref), out_ref = nn.LSTMCell(5).apply({"params": params}, carry, x)
    (c, h), out = cell(carry, x)
    np.testing.assert_allclose(c, c_ref, **TOL)
    np.testing.assert_allclose(h, h_ref, **TOL)
    np.testing.assert_allclose(out, out_ref, **TOL)


def test_lstm_cell_initialisation(getkey):
    cell = ea.LSTMCell(3, 5, key=getkey())
    for g in range(4):
        u = cell.recurrent_kernel[:, g]
        np.testing.assert_allclose(u.T @ u, jnp.eye(5), atol=1e-5)
    np.testing.assert_array_equal(cell.bias, 0)


def test_lstm_returns_last_hidden_state(getkey):
    lstm = ea.LSTM(3, 4, key=getkey())
    xs = jax.random.normal(getkey(), (7, 3))
    carry = lstm.cell.initial_state()
    for x in xs:
        carry, h = lstm.cell(carry, x)
    np.testing.assert_allclose(lstm(xs), h, **TOL)


# ------------------------------------------------------------------------------------------
# attend and the attention configurations


def _attend_reference(q, k, v, mask):
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
    probs = np.nan_to_num(probs)  # all-masked rows -> zeros, as flax-extra
    return np.einsum("hqk,khd->qhd", probs, v).reshape(q.shape[0], -1)


def test_attend_matches_reference_and_zeros_masked_rows(getkey):
    q = jax.random.normal(getkey(), (5, 2, 4))
    k = jax.random.normal(getkey(), (7, 2, 4))
    v = jax.random.normal(getkey(), (7, 2, 3))
    mask_q = jnp.array([True, True, False, True, False])
    mask_kv = jnp.array([True, False, True, True, True, False, True])
    mask = ea.cross_attention_mask(mask_q, mask_kv)
    out = ea.attend(q, k, v, mask)
    assert out.shape == (5, 6)
    np.testing.assert_allclose(out, _attend_reference(*map(np.asarray, (q, k, v, mask))), **TOL)
    np.testing.assert_array_equal(out[~mask_q], 0)
    unmasked = ea.attend(q, k, v)
    np.testing.assert_allclose(unmasked, _attend_reference(q, k, v, np.ones((5, 7), bool)), **TOL)


def test_attend_dropout(getkey):
    q, k, v = (jax.random.normal(getkey(), (4, 2, 3)) for _ in range(3))
    clean = ea.attend(q, k, v)
    np.testing.assert_array_equal(ea.attend(q, k, v, dropout_p=0.5, inference=True), clean)
    # As in MultiheadAttention and Equinox: `key_` is the attention key, `key` the PRNG key.
    dropped = ea.attend(q, k, v, dropout_p=0.5, key=getkey())
    assert not np.allclose(dropped, clean)
    with pytest.raises(ValueError, match=r"attend\(dropout_p=0\.5\) needs a PRNG `key`"):
        ea.attend(q, k, v, dropout_p=0.5)


def test_key_padding_masks_broadcast(getkey):
    """A `(1, kv_seq)` key-padding mask means its broadcast over queries, for `attend` and
    both attention layers."""
    x_q, x_kv = jax.random.normal(getkey(), (5, 8)), jax.random.normal(getkey(), (7, 6))
    keep = jax.random.bernoulli(getkey(), 0.7, (1, 7)).at[0, 0].set(True)
    cross = ea.CrossAttention(2, 8, 6, key=getkey())
    np.testing.assert_allclose(
        cross(x_q, x_kv, keep), cross(x_q, x_kv, jnp.broadcast_to(keep, (5, 7))), **TOL
    )
    self_attention = ea.SelfAttention(2, 6, key=getkey())
    square = jnp.broadcast_to(keep, (7, 7))
    np.testing.assert_allclose(self_attention(x_kv, keep), self_attention(x_kv, square), **TOL)
    q, k = x_q.reshape(5, 2, 4), jax.random.normal(getkey(), (7, 2, 4))
    full = jnp.broadcast_to(keep, (5, 7))
    np.testing.assert_allclose(ea.attend(q, k, k, keep), ea.attend(q, k, k, full), **TOL)


def _sizes(attn: ea.CrossAttention | ea.SelfAttention):
    m = attn.attention
    return m.num_heads * m.qk_size, m.num_heads * m.vo_size, m.output_size


def test_cross_attention_default_widths(getkey):
    qkv = ea.CrossAttention(2, 8, 6, key=getkey())
    assert _sizes(qkv) == (8, 8, 8)  # qk follows the query, output follows the value
    assert ea.QKVAttention is ea.CrossAttention
    kvq = ea.KVQAttention(2, 8, 6, key=getkey())
    assert isinstance(kvq, ea.CrossAttention)
    assert _sizes(kvq) == (6, 6, 8)  # qk follows the key/value input, output the query
    custom = ea.CrossAttention(2, 8, 6, qk_channels=4, v_channels=10, key=getkey())
    assert _sizes(custom) == (4, 10, 10)
    assert _sizes(ea.SelfAttention(4, 12, key=getkey())) == (12, 12, 12)
    assert ea.CrossAttention(2, 8, 6, key=getkey()).attention.use_output_bias
    with pytest.raises(ValueError, match="qk_channels=6 is not divisible by num_heads=4"):
        ea.KVQAttention(4, 8, 6, key=getkey())
    with pytest.raises(jaxtyping.TypeCheckError, match="shape_for_attn"):
        ea.CrossAttention(2, 8, 6, shape_for_attn="v", key=getkey())


def test_cross_attention_is_projections_around_attend(getkey):
    attn = ea.KVQAttention(2, 8, 6, key=getkey())
    m = attn.attention
    x_q = jax.random.normal(getkey(), (5, 8))
    x_kv = jax.random.normal(getkey(), (9, 6))
    mask = jax.random.bernoulli(getkey(), 0.7, (5, 9))

    def project(linear, x):
        return jax.vmap(linear)(x).reshape(x.shape[0], 2, -1)

    heads = ea.attend(project(m.query_proj, x_q), project(m.key_proj, x_kv),
                      project(m.value_proj, x_kv), mask)  # fmt: skip
    expected = jax.vmap(m.output_proj)(heads)
    np.testing.assert_allclose(attn(x_q, x_kv, mask), expected, **TOL)
    out, weights = attn(x_q, x_kv, mask, return_weights=True)
    assert weights.shape == (2, 5, 9)
    np.testing.assert_array_equal(jnp.where(mask, 0, weights), 0)


def test_self_attention_is_cross_attention_to_itself(getkey):
    attn = ea.SelfAttention(2, 8, key=getkey())
    x = jax.random.normal(getkey(), (5, 8))
    mask = jnp.tril(jnp.ones((5, 5), bool))
    np.testing.assert_allclose(attn(x, mask), attn.attention(x, x, x, mask), **TOL)


# ------------------------------------------------------------------------------------------
# Encoding and decoding


def test_encoding_concatenates_or_adds_positions():
    fourier = ea.FourierPositionEncoding((4, 5), 2)
    image = jnp.arange(20.0).reshape(4, 5, 1)
    encoded = ea.Encoding(positional_encoding=fourier)(image)
    assert encoded.shape == (20, 1 + fourier.num_channels)
    np.testing.assert_array_equal(encoded[:, 0], jnp.arange(20.0))
    np.testing.assert_array_equal(encoded[:, 1:], fourier())
    added = ea.Encoding(lambda x: jnp.tile(x, 10), fourier, aggregation=jnp.add)(image)
    np.testing.assert_allclose(added, jnp.tile(image.reshape(20, 1), 10) + fourier(), **TOL)
    subset = jnp.array([3, 17])
    np.testing.assert_array_equal(
        ea.Encoding(positional_encoding=fourier)(image.reshape(20, 1)[subset], subset),
        encoded[subset],
    )
    assert ea.Encoding()(image).shape == (20, 1)
    with pytest.raises(ValueError, match="no positional_encoding"):
        ea.Encoding()(image, subset)


def test_decoding(getkey):
    linear = eqx.nn.Linear(4, 3, key=getkey())
    decoding = ea.Decoding(linear, lambda y: y.reshape(2, 5, 3))
    x = jax.random.normal(getkey(), (10, 4))
    np.testing.assert_allclose(decoding(x), jax.vmap(linear)(x).reshape(2, 5, 3), **TOL)
    np.testing.assert_array_equal(ea.Decoding()(x), x)


def test_embed_decoding_ties_weights_through_shared(getkey):
    embed = eqx.nn.Embedding(11, 4, key=getkey())
    decode = ea.EmbedDecoding(embed.weight)
    x = jax.random.normal(getkey(), (3, 4))
    np.testing.assert_allclose(decode(x), x @ embed.weight.T, **TOL)
    shared = eqx.nn.Shared(
        (embed, decode), where=lambda pair: pair[1].embedding, get=lambda pair: pair[0].weight
    )

    def loss(shared, tokens):
        embed, decode = shared()
        return jnp.sum(ea.Decoding(decode)(jax.vmap(embed)(tokens)) ** 2)

    tokens = jnp.array([1, 4, 4])
    grads = eqx.filter_grad(loss)(shared, tokens)
    # The decoder's use of the matrix flows into the one shared array: rows the decoding
    # touches (all of them) get gradient, not only the three embedded tokens.
    g = grads.pytree[0].weight
    assert int(jnp.sum(jnp.any(g != 0, axis=-1))) == 11


def test_multimodal_positional_encoding(getkey):
    fourier = ea.FourierPositionEncoding((3, 4), 2)  # 10 channels
    trainable = ea.TrainablePositionalEncoding(5, 6, key=getkey())
    multi = ea.MultimodalPositionalEncoding([fourier, trainable], d_reserved=2, key=getkey())
    x, lengths = multi()
    assert lengths == (12, 5)
    assert x.shape == (17, 12)
    np.testing.assert_array_equal(x[:12, :10], fourier())
    np.testing.assert_array_equal(x[12:, :6], trainable())
    sub, sub_lengths = multi([jnp.array([0, 11]), None])
    assert sub_lengths == (2, 5)
    np.testing.assert_array_equal(sub[:2], x[jnp.array([0, 11])])


def test_multimodal_encoding_and_decoding_round_trip(getkey):
    image = ea.Encoding(positional_encoding=ea.FourierPositionEncoding((4, 4), 2))  # 1 + 10
    audio = ea.Encoding(positional_encoding=ea.TrainablePositionalEncoding(6, 3, key=getkey()))
    multi = ea.MultimodalEncoding(
        [image, audio], [(4, 4, 1), (6, 2)], mask_rates=[None, 0.5], key=getkey()
    )
    inputs = [jax.random.normal(getkey(), (4, 4, 1)), jax.random.normal(getkey(), (6, 2))]
    x, lengths = multi(inputs, inference=True)
    assert lengths == (16, 6)
    assert x.shape == (22, 12)
    np.testing.assert_array_equal(x[:16, :11], image(inputs[0]))
    np.testing.assert_array_equal(x[16:, :5], audio(inputs[1]))
    # Training mode: the second modality's masking needs a key and only touches that part.
    masked, _ = multi(inputs, key=getkey())
    np.testing.assert_array_equal(masked[:16], x[:16])
    with pytest.raises(ValueError, match="needs a key"):
        multi(inputs)

    image_decoding = ea.Decoding(postprocessing=lambda y: y[:, :11])
    audio_decoding = ea.Decoding(eqx.nn.Linear(12, 2, key=getkey()))
    decoding = ea.MultimodalDecoding([image_decoding, audio_decoding])
    image_out, audio_out = decoding(x, lengths)
    np.testing.assert_array_equal(image_out, image(inputs[0]))
    assert audio_out.shape == (6, 2)
    with pytest.raises(ValueError, match="must sum to"):
        decoding(x, (16, 5))
    with pytest.raises(ValueError, match="expected 2 lengths"):
        decoding(x, (22,))


# ------------------------------------------------------------------------------------------
# Transformations and serialisation


def test_layers_jit_vmap_grad(getkey):
    attn = ea.KVQAttention(2, 8, 6, key=getkey())
    ff = ea.FeedForward(8, 2, key=getkey())
    lstm = ea.LSTM(6, 8, key=getkey())

    def model(modules, q, kv):
        attn, ff, lstm = modules
        return ff(attn(q, kv)) + lstm(kv)

    modules = (attn, ff, lstm)
    q = jax.random.normal(getkey(), (3, 5, 8))
    kv = jax.random.normal(getkey(), (3, 7, 6))
    batched = eqx.filter_jit(jax.vmap(model, (None, 0, 0)))(modules, q, kv)
    np.testing.assert_allclose(batched[1], eqx.filter_jit(model)(modules, q[1], kv[1]), **TOL)

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(modules):
        return jnp.sum(jax.vmap(model, (None, 0, 0))(modules, q, kv) ** 2)

    grads = grads(modules)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert float(jnp.abs(grads[0].attention.key_proj.weight).sum()) > 0


def test_layers_serialisation_round_trip(getkey):
    def build(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return (
            ea.MultimodalPositionalEncoding(
                [ea.FourierPositionEncoding((3,), 2), ea.TrainablePositionalEncoding(4, 3, key=k1)],
                key=k2,
            ),
            ea.TrainablePositionalMasking(6, 0.25, key=k3),
            ea.LSTMCell(2, 3, key=k3),
        )

    original = build(getkey())
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, original)
    buffer.seek(0)
    restored = eqx.tree_deserialise_leaves(buffer, build(getkey()))
    for a, b in zip(
        jax.tree_util.tree_leaves(original), jax.tree_util.tree_leaves(restored), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Equinox's conventions


def _sequential_layers(key):
    k = jax.random.split(key, 6)
    return [
        (ea.RotaryPositionalEmbedding(8), (5, 8)),
        (ea.SinusoidalPositionalEmbedding(8), (5, 8)),
        (ea.FeedForward(8, 2, key=k[0]), (5, 8)),
        (ea.TrainablePositionalPadding(8, 12, key=k[1]), (5, 8)),
        (ea.TrainablePositionalMasking(8, 0.5, key=k[2]), (5, 8)),
        (ea.Encoding(positional_encoding=ea.TrainablePositionalEncoding(5, 4, key=k[3])), (5, 8)),
        (ea.Decoding(postprocessing=jnp.tanh), (5, 8)),
        (ea.EmbedDecoding(jnp.ones((11, 8))), (5, 8)),
        (ea.LSTM(8, 6, key=k[4]), (5, 8)),
        (ea.MultiheadAttention(2, 8, key=k[5]), (5, 8)),
    ]


def test_every_layer_composes_in_sequential(getkey):
    """`eqx.nn.Sequential` passes `key=` to every layer; each accepts it (ignored where unused)."""
    for layer, shape in _sequential_layers(getkey()):
        x = jax.random.normal(getkey(), shape)
        out = eqx.nn.Sequential([eqx.nn.Lambda(lambda x: x), layer])(x, key=getkey())
        assert out.shape[0] == shape[0] or type(layer) is ea.LSTM, type(layer).__name__
    # Layers without an input take `key=` too.
    fourier = ea.FourierPositionEncoding((4,), 2)
    assert fourier(key=getkey()).shape == fourier().shape
    table = ea.TrainablePositionalEncoding(5, 4, key=getkey())
    np.testing.assert_array_equal(table(key=getkey()), table())
    cell = ea.LSTMCell(3, 4, key=getkey())
    cell(cell.initial_state(), jnp.ones(3), key=getkey())


def test_callables_are_not_static_fields(getkey):
    """A callable field is part of the pytree (Equinox: static "should very rarely be
    used"), so a module used as an activation or aggregation is trained with the layer."""
    ff = ea.FeedForward(4, 2, activation=eqx.nn.PReLU(), key=getkey())
    x = jax.random.normal(getkey(), (3, 4))
    # A static field would hide the slope from the leaves (and return it, not its gradient).
    assert any(leaf is ff.activation.negative_slope for leaf in jax.tree.leaves(ff))
    grads = eqx.filter_grad(lambda f: jnp.sum(f(x) ** 2))(ff)
    slope = eqx.filter_grad(lambda a: jnp.sum(eqx.tree_at(lambda f: f.activation, ff, a)(x) ** 2))(
        ff.activation
    )
    np.testing.assert_allclose(grads.activation.negative_slope, slope.negative_slope)
    assert float(slope.negative_slope) != float(ff.activation.negative_slope)

    class ScaledAdd(eqx.Module):
        weight: jax.Array

        def __call__(self, x, p):
            return x + self.weight * p

    aggregation = ScaledAdd(jnp.array(2.0))
    enc = ea.Encoding(
        positional_encoding=ea.TrainablePositionalEncoding(3, 4, key=getkey()),
        aggregation=aggregation,
    )
    assert any(leaf is aggregation.weight for leaf in jax.tree.leaves(enc))
    grads = eqx.filter_grad(lambda e: jnp.sum(e(jnp.ones((3, 4)))))(enc)
    # d/dw sum(x + w p) = sum(p): the gradient, not the parameter's value 2.
    np.testing.assert_allclose(grads.aggregation.weight, jnp.sum(enc.positional_encoding()), **TOL)


def test_kvq_attention_is_a_class(getkey):
    """flax-extra's `KVQAttention` is a class: `isinstance` works, and it is a
    `CrossAttention` with `shape_for_attn="kv"` (same draws for the same key)."""
    key = getkey()
    kvq = ea.KVQAttention(2, 8, 6, key=key)
    assert isinstance(kvq, ea.KVQAttention) and isinstance(kvq, ea.CrossAttention)
    assert eqx.tree_equal(
        kvq.attention, ea.CrossAttention(2, 8, 6, shape_for_attn="kv", key=key).attention
    )


def test_flax_extra_positional_arguments_mean_the_same(getkey):
    """After the sizes an Equinox layer needs, positional arguments follow flax-extra's
    order; arguments flax-extra lacks are keyword only."""
    # flax-extra: FourierPositionEncoding(seqshape, n_bands, spatial_coordinate_bounds,
    # use_spatial_coordinates, use_sine_only).
    positional = ea.FourierPositionEncoding((4,), 2, (-2, 1), False, True)
    keyword = ea.FourierPositionEncoding(
        (4,), 2, bounds=(-2, 1), concat_positions=False, sine_only=True
    )
    np.testing.assert_array_equal(positional(), keyword())
    assert positional.bounds == (-2.0, 1.0) and not positional.concat_positions
    with pytest.raises(TypeError):
        ea.FourierPositionEncoding((4,), 2, (-2, 1), False, True, (8,))
    # flax-extra: Attention(n_heads, d_qk, d_v, d_output, ..., use_bias, dropout_rate,
    # deterministic); here after the two input sizes.
    cross = ea.CrossAttention(2, 8, 6, None, None, None, False, 0.25, True, key=getkey())
    assert not cross.attention.use_query_bias
    assert (cross.attention.dropout.p, cross.attention.dropout.inference) == (0.25, True)
    with pytest.raises(TypeError):
        ea.CrossAttention(2, 8, 6, None, None, None, False, 0.25, True, None, "kv", key=getkey())

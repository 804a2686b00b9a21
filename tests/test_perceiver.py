"""Perceiver IO: blocks, encoder (padding mask, shared self-attention), decoder (subsets,
chunks), the whole model under jit/vmap/grad, and serialisation."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_attention as ea
from eqx_attention._kernels import XLA_MAX_LOGITS

TOL = dict(rtol=1e-5, atol=1e-5)


def _encoder(key, input_size=5, **kwargs):
    kwargs = dict(num_latents=4, latent_size=16, num_self_heads=2) | kwargs
    return ea.PerceiverEncoder(input_size, key=key, **kwargs)


def test_cross_attention_block(getkey):
    key = getkey()
    block = ea.CrossAttentionBlock(2, 8, 6, key=key)
    no_residual = ea.CrossAttentionBlock(2, 8, 6, use_query_residual=False, key=key)
    q = jax.random.normal(getkey(), (3, 8))
    kv = jax.random.normal(getkey(), (7, 6))

    @eqx.filter_jit
    def outputs_and_references(block, no_residual, q, kv):
        attended = block.attention(jax.vmap(block.query_norm)(q), jax.vmap(block.kv_norm)(kv))
        with_residual = q + attended
        refs = [x + block.mlp(jax.vmap(block.mlp_norm)(x)) for x in (with_residual, attended)]
        return block(q, kv), no_residual(q, kv), refs, block(q, kv, return_weights=True)[1]

    out, out_no_residual, (ref, ref_no_residual), weights = outputs_and_references(
        block, no_residual, q, kv
    )
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(out_no_residual, ref_no_residual, **TOL)
    assert weights.shape == (2, 3, 7)
    np.testing.assert_allclose(weights.sum(-1), 1, **TOL)


def test_self_attention_block(getkey):
    block = ea.SelfAttentionBlock(2, 8, widening_factor=2, key=getkey())
    x = jax.random.normal(getkey(), (5, 8))

    @eqx.filter_jit
    def output_and_reference(block, x):
        y = x + block.attention(jax.vmap(block.attention_norm)(x))
        return block(x), y + block.mlp(jax.vmap(block.mlp_norm)(y))

    np.testing.assert_allclose(*output_and_reference(block, x), **TOL)


def test_encoder_shapes_and_shared_self_attention(getkey):
    encoder = _encoder(getkey(), num_blocks=3, num_self_attends_per_block=2)
    # One set of self-attention weights per layer of the stack, not per repeat.
    assert encoder.self_attends.attention.attention.query_proj.weight.shape == (2, 16, 16)
    inputs = jax.random.normal(getkey(), (9, 5))

    @eqx.filter_jit
    def output_and_reference(encoder, inputs):
        x = encoder.cross_attend(encoder.latents(), inputs)
        params, static = eqx.partition(encoder.self_attends, eqx.is_array)
        layers = [
            eqx.combine(jax.tree_util.tree_map(lambda a, i=i: a[i], params), static)
            for i in range(2)
        ]
        for _ in range(3):
            for layer in layers:
                x = layer(x)
        return encoder(inputs), x

    out, ref = output_and_reference(encoder, inputs)
    assert out.shape == (4, 16)
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("seq,implementation", [(37, "xla"), (8500, "chunked")])
def test_padded_inputs_never_change_the_encoding(seq, implementation, getkey):
    # 8 latents x 8500 inputs is past the core's materialising limit: the automatic choice
    # is the chunked kernel there, and the reference implementation below it.
    encoder = _encoder(getkey(), num_latents=8)
    assert (8 * seq > XLA_MAX_LOGITS) == (implementation == "chunked")
    inputs = jax.random.normal(getkey(), (seq, 5))
    mask = jax.random.bernoulli(getkey(), 0.6, (seq,))
    garbage = jnp.where(mask[:, None], inputs, 1e3 * jax.random.normal(getkey(), (seq, 5)))
    encoder = eqx.filter_jit(encoder)
    with_mask = encoder(inputs, mask)
    np.testing.assert_array_equal(encoder(garbage, mask), with_mask)
    # ... and equal the encoding of the real inputs alone.
    real = inputs[np.asarray(mask)]
    np.testing.assert_allclose(encoder(real), with_mask, rtol=1e-4, atol=1e-4)


def test_fully_masked_inputs_give_latents_independent_of_inputs(getkey):
    encoder = eqx.filter_jit(_encoder(getkey()))
    mask = jnp.zeros(6, bool)
    a = encoder(jax.random.normal(getkey(), (6, 5)), mask)
    b = encoder(jax.random.normal(getkey(), (6, 5)), mask)
    np.testing.assert_array_equal(a, b)
    assert bool(jnp.all(jnp.isfinite(a)))


def _decoder(key):
    return ea.PerceiverDecoder(ea.FourierPositionEncoding((5, 6), 3), 16, 3, key=key)


def test_subset_and_chunked_decoding_match_full_decoding(getkey):
    decoder = _decoder(getkey())
    latents = jax.random.normal(getkey(), (4, 16))
    positions = jnp.array([29, 0, 13, 13, 7])

    @eqx.filter_jit
    def decodings(decoder, latents):
        chunked = [decoder(latents, chunk_size=c) for c in (1, 7, 30, 64)]
        return (
            decoder(latents),
            decoder(latents, positions),
            chunked,
            decoder(latents, positions, chunk_size=2),
        )

    full, subset, chunked, subset_chunked = decodings(decoder, latents)
    assert full.shape == (30, 3)
    np.testing.assert_allclose(subset, full[positions], **TOL)
    for out in chunked:
        np.testing.assert_allclose(out, full, **TOL)
    np.testing.assert_allclose(subset_chunked, full[positions], **TOL)
    with pytest.raises(ValueError, match="chunk_size"):
        decoder(latents, chunk_size=0)


def _model(key, dropout_p=0.0):
    k1, k2 = jax.random.split(key)
    fourier = ea.FourierPositionEncoding((4, 4), 2)
    encoder = _encoder(k1, input_size=1 + fourier.num_channels, dropout_p=dropout_p)
    decoder = ea.PerceiverDecoder(fourier, 16, 2, dropout_p=dropout_p, key=k2)
    return ea.PerceiverIO(encoder, decoder, ea.Encoding(positional_encoding=fourier))


def test_perceiver_io_jit_vmap_grad(getkey):
    model = _model(getkey())
    images = jax.random.normal(getkey(), (3, 4, 4, 1))

    @eqx.filter_jit
    def batched_and_single(model, images):
        return jax.vmap(model)(images), model(images[1])

    batched, single = batched_and_single(model, images)
    assert batched.shape == (3, 16, 2)
    np.testing.assert_allclose(batched[1], single, **TOL)

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(model):
        return jnp.sum(jax.vmap(model)(images) ** 2)

    g = grads(model)
    for leaf in jax.tree_util.tree_leaves(g):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert float(jnp.abs(g.encoder.latents.weight).sum()) > 0
    assert float(jnp.abs(g.encoder.self_attends.mlp.hidden.weight).sum()) > 0


def test_perceiver_io_dropout(getkey):
    model = _model(getkey(), dropout_p=0.3)
    image = jax.random.normal(getkey(), (4, 4, 1))
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        eqx.filter_eval_shape(model, image)
    call = eqx.filter_jit(
        lambda model, image, key, inference: model(image, key=key, inference=inference)
    )
    a, b = (call(model, image, getkey(), False) for _ in range(2))
    assert not np.allclose(a, b)
    clean = call(model, image, None, True)
    np.testing.assert_array_equal(call(eqx.nn.inference_mode(model), image, None, None), clean)


def test_perceiver_io_serialisation_round_trip(getkey, tmp_path):
    model = _model(getkey())
    path = tmp_path / "perceiver.eqx"
    eqx.tree_serialise_leaves(path, model)
    restored = eqx.tree_deserialise_leaves(path, _model(getkey()))
    image = jax.random.normal(getkey(), (4, 4, 1))
    call = eqx.filter_jit(lambda model, image: model(image))
    np.testing.assert_array_equal(call(restored, image), call(model, image))
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, restored)
    assert buffer.getvalue() == path.read_bytes()

"""Smoke test of `make demo`'s script, docs/examples/char_lm.py, with a tiny model."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).parents[1] / "docs" / "examples" / "char_lm.py"
_spec = importlib.util.spec_from_file_location("char_lm", _PATH)
char_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(char_lm)

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--kv-heads", "1", "--context", "16"]


@pytest.mark.parametrize("attention", ["eqx_attention", "equinox"])
def test_trains_checkpoints_and_generates(tmp_path, attention):
    args = [*TINY, "--attention", attention, "--batch", "8", "--steps", "40", "--minutes", "0"]
    args += ["--lr", "1e-2", "--generate", "24", "--out", str(tmp_path)]
    result = char_lm.main(args)

    losses = np.array(result["loss"])
    assert len(losses) == 40
    # From ~log(103) = 4.6 nats (uniform) to character frequencies (~3.3 nats) in 40 steps.
    assert losses[-10:].mean() < losses[:5].mean() - 0.5
    assert 0 < result["valid"][-1] < 4.5
    assert len(result["sample"]) == 24
    for name in ("model.eqx", "config.json", "loss.png", "attention.png"):
        assert (tmp_path / name).stat().st_size > 0

    # --generate-only rebuilds the model from config.json and the checkpoint: the same seed
    # then samples the same text (architecture flags on the command line are not needed).
    again = char_lm.main(["--generate-only", "--generate", "24", "--out", str(tmp_path)])
    assert again["sample"] == result["sample"]
    assert "loss" not in again


def test_cached_decoding_matches_recomputation(getkey):
    # Sampling with the same keys from the same distributions gives the same characters; 40
    # new characters after a 12-character prompt go well past the 16-character context, so
    # the ring-buffer cache wraps around while recomputation slides its window.
    corpus = char_lm.load_corpus()
    config = char_lm.Config(corpus.vocab, "eqx_attention", 2, 32, 4, 2, 16)
    model = char_lm.CharTransformer(config, key=getkey())
    prompt = corpus.encode("The for loop")
    key = getkey()
    cached, cached_speed = char_lm.generate_cached(model, prompt, 40, key, 1.0)
    recomputed, _ = char_lm.generate_recomputing(model, prompt, 40, key, 1.0)
    np.testing.assert_array_equal(cached, recomputed)
    assert cached_speed > 0


def test_cached_step_compiles_once(getkey):
    # A decoding step that recompiled per token (say, for a Python-int position) would show
    # up here as one compilation per generated character.
    corpus = char_lm.load_corpus()
    # Shapes no other test uses, so this process has not compiled the step for them yet.
    config = char_lm.Config(corpus.vocab, "eqx_attention", 1, 24, 3, 1, 8)
    model = char_lm.CharTransformer(config, key=getkey())
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", ""))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        char_lm.generate_cached(model, corpus.encode("def"), 30, getkey(), 1.0)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sum("_cached_step" in name for name in compiled) == 1, compiled


def test_validation_topics_are_held_out():
    corpus = char_lm.load_corpus()
    train = corpus.decode(corpus.train)
    valid = corpus.decode(corpus.valid)
    assert 0.08 < len(valid) / (len(train) + len(valid)) < 0.2
    # Topics quote each other (all of `help("for")` is in `help("compound")`): without the
    # de-duplication most validation paragraphs would be training text. A few short ones
    # still occur inside differently split training paragraphs.
    paragraphs = [p for p in valid.split("\n\n") if len(p) > 80]
    assert len(paragraphs) > 50
    leaked = sum(len(p) for p in paragraphs if p in train)
    assert leaked < 0.01 * len(valid)


def test_dropout_only_when_training(getkey):
    corpus = char_lm.load_corpus()
    config = char_lm.Config(corpus.vocab, "eqx_attention", 1, 24, 3, 1, 8, dropout=0.5)
    model = char_lm.CharTransformer(config, key=getkey())
    tokens = jnp.asarray(corpus.encode("for x in"))
    evaluated, _ = model(tokens)
    again, _ = model(tokens)
    trained, _ = model(tokens, key=getkey())
    np.testing.assert_array_equal(evaluated, again)
    assert not np.allclose(evaluated, trained)

"""A character-level language model on Python's own help text, decoded with a KV cache.

```bash
make demo                                                     # the defaults: ~3 minutes of training
.venv/bin/python docs/examples/char_lm.py --attention equinox  # the same model on equinox.nn
.venv/bin/python docs/examples/char_lm.py --generate-only --prompt "The with statement"
```

The corpus is `pydoc_data.topics`, the text of `help("for")` and friends, shipped with every
CPython. The model is a small decoder-only transformer built from this library's
[`eqx_attention.MultiheadAttention`][] (grouped-query attention, rotary embeddings, QK-norm,
causal attention through the fast core). Training stops at whichever comes first of `--steps`
(1100 by default, about six passes over the corpus) and `--minutes`, so `--attention equinox`
(the same model on `equinox.nn.MultiheadAttention`) gets the same budget and the printed
tokens/s and bits/char compare the two. Everything
is written to `--out`: the checkpoint, its config, `loss.png` and `attention.png`.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import pydoc_data.topics
import random
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm import tqdm

import eqx_attention as ea

# ------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Corpus:
    vocab: str
    train: np.ndarray
    valid: np.ndarray
    valid_topics: tuple[str, ...]

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise ValueError(f"characters {unknown} are not in the model's vocabulary")
        return np.array([index[c] for c in text], dtype=np.int32)

    def decode(self, tokens) -> str:
        return "".join(self.vocab[int(t)] for t in tokens)


def load_corpus(valid_fraction: float = 0.1) -> Corpus:
    """Python's help topics, split into training and validation *by topic*.

    Many topics quote others (`help("for")` is a section of `help("compound")`), so repeated
    paragraphs are kept only in the longest topic that contains them; otherwise the held-out
    text would also be training text.
    """
    topics = pydoc_data.topics.topics
    seen = set()
    text = {}
    for name in sorted(topics, key=lambda n: (-len(topics[n]), n)):
        paragraphs = topics[name].split("\n\n")
        text[name] = "\n\n".join(p for p in paragraphs if p not in seen)
        seen.update(paragraphs)
    names = [n for n in sorted(text) if text[n]]
    # A fixed shuffle, independent of --seed, so every run is scored on the same topics.
    random.Random(0).shuffle(names)
    total = sum(len(text[n]) for n in names)
    valid_topics = []
    valid_chars = 0
    while valid_chars < valid_fraction * total:
        valid_topics.append(names.pop(0))
        valid_chars += len(text[valid_topics[-1]])
    # The vocabulary is the character set of the whole corpus: a character seen only in
    # validation topics gets an (untrained) embedding instead of breaking the encoder.
    vocab = "".join(sorted(set("".join(text.values()))))
    corpus = Corpus(vocab, np.zeros(0, np.int32), np.zeros(0, np.int32), tuple(valid_topics))
    join = "\n\n".join
    return dataclasses.replace(
        corpus,
        train=corpus.encode(join(text[n] for n in names)),
        valid=corpus.encode(join(text[n] for n in valid_topics)),
    )


def sample_batch(rng: np.random.Generator, data: np.ndarray, batch: int, length: int):
    """`batch` random windows of `length + 1` characters: inputs and shifted targets."""
    starts = rng.integers(0, len(data) - length - 1, size=batch)
    windows = data[starts[:, None] + np.arange(length + 1)]
    return windows[:, :-1], windows[:, 1:]


# ------------------------------------------------------------------------------------------
# Model


class EquinoxAttention(eqx.Module):
    """The baseline: `equinox.nn.MultiheadAttention` with the same RoPE and QK-norm, added
    through its `process_heads` hook. It has no GQA, KV cache or fused causal masking."""

    mha: eqx.nn.MultiheadAttention
    rope: eqx.nn.RotaryPositionalEmbedding
    query_norm: eqx.nn.LayerNorm
    key_norm: eqx.nn.LayerNorm

    def __init__(self, num_heads: int, width: int, *, key: PRNGKeyArray):
        head_size = width // num_heads
        self.mha = eqx.nn.MultiheadAttention(num_heads, width, key=key)
        self.rope = eqx.nn.RotaryPositionalEmbedding(head_size)
        # The QK-norm of `eqx_attention.MultiheadAttention(normalize_qk=True)`.
        self.query_norm = eqx.nn.LayerNorm(head_size, eps=1e-6, use_bias=False)
        self.key_norm = eqx.nn.LayerNorm(head_size, eps=1e-6, use_bias=False)

    def process_heads(self, q, k, v):
        over_heads = lambda f: jax.vmap(f, in_axes=1, out_axes=1)  # noqa: E731
        q = over_heads(self.rope)(over_heads(jax.vmap(self.query_norm))(q))
        k = over_heads(self.rope)(over_heads(jax.vmap(self.key_norm))(k))
        return q, k, v

    def __call__(self, x: Float[Array, "seq width"]) -> Float[Array, "seq width"]:
        causal = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), dtype=bool))
        return self.mha(x, x, x, mask=causal, process_heads=self.process_heads)


class Block(eqx.Module):
    """Pre-norm residual block: `x + attention(norm(x))`, then `x + mlp(norm(x))`."""

    attention_norm: eqx.nn.RMSNorm
    attention: ea.MultiheadAttention | EquinoxAttention
    mlp_norm: eqx.nn.RMSNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, config: "Config", *, key: PRNGKeyArray):
        attention_key, in_key, out_key = jax.random.split(key, 3)
        width = config.width
        self.attention_norm = eqx.nn.RMSNorm(width, use_bias=False)
        if config.attention == "eqx_attention":
            self.attention = ea.MultiheadAttention(
                config.heads,
                width,
                num_kv_heads=config.kv_heads,
                rope=ea.RotaryPositionalEmbedding(width // config.heads),
                normalize_qk=True,
                key=attention_key,
            )
        else:
            self.attention = EquinoxAttention(config.heads, width, key=attention_key)
        self.mlp_norm = eqx.nn.RMSNorm(width, use_bias=False)
        self.mlp_in = eqx.nn.Linear(width, 4 * width, key=in_key)
        self.mlp_out = eqx.nn.Linear(4 * width, width, key=out_key)
        self.dropout = eqx.nn.Dropout(config.dropout)

    def __call__(self, x, cache=None, *, key: PRNGKeyArray | None = None):
        """Without `key` (evaluation, decoding) there is no dropout."""
        attention_key, mlp_key = (None, None) if key is None else jax.random.split(key)
        h = jax.vmap(self.attention_norm)(x)
        if isinstance(self.attention, EquinoxAttention):
            h = self.attention(h)
        elif cache is None:
            h = self.attention(h, is_causal=True)
        else:
            # Each new token sees itself and the `cache.window` tokens before it.
            window = (cache.window, 0)
            h, cache = self.attention(h, is_causal=True, local_window_size=window, cache=cache)
        x = x + self.dropout(h, key=attention_key, inference=key is None)
        h = _dense(self.mlp_in, jax.vmap(self.mlp_norm)(x))
        h = _dense(self.mlp_out, jax.nn.gelu(h))
        x = x + self.dropout(h, key=mlp_key, inference=key is None)
        return x, cache


def _dense(linear: eqx.nn.Linear, x: Float[Array, "seq a"]) -> Float[Array, "seq b"]:
    """`jax.vmap(linear)(x)` as one `x @ W.T`: the vmapped form makes XLA:CPU compute
    `W @ x.T` and transpose it back, which cost 13% of the training step here."""
    return x @ linear.weight.T + linear.bias


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything needed to rebuild the model's shape from a checkpoint."""

    vocab: str
    attention: str
    layers: int
    width: int
    heads: int
    kv_heads: int
    context: int
    dropout: float = 0.0


class CharTransformer(eqx.Module):
    embedding: eqx.nn.Embedding
    blocks: tuple[Block, ...]
    final_norm: eqx.nn.RMSNorm
    unembedding: eqx.nn.Linear
    context: int = eqx.field(static=True)

    def __init__(self, config: Config, *, key: PRNGKeyArray):
        embed_key, head_key, *block_keys = jax.random.split(key, config.layers + 2)
        self.embedding = eqx.nn.Embedding(len(config.vocab), config.width, key=embed_key)
        self.blocks = tuple(Block(config, key=k) for k in block_keys)
        self.final_norm = eqx.nn.RMSNorm(config.width, use_bias=False)
        self.unembedding = eqx.nn.Linear(config.width, len(config.vocab), key=head_key)
        self.context = config.context

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        caches: tuple | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "seq vocab"], tuple | None]:
        """Logits for the next character at every position of one example.

        With `caches` (one per block, from [`init_caches`][]) the tokens continue the cached
        sequence and the updated caches are returned; attention then looks back at most
        `context` characters, the length the model was trained on. `key` switches on
        dropout, for training.
        """
        x = self.embedding.weight[tokens]
        new_caches = []
        keys = [None] * len(self.blocks) if key is None else jax.random.split(key, len(self.blocks))
        for i, (block, block_key) in enumerate(zip(self.blocks, keys, strict=True)):
            x, cache = block(x, None if caches is None else caches[i], key=block_key)
            new_caches.append(cache)
        logits = _dense(self.unembedding, jax.vmap(self.final_norm)(x))
        return logits, None if caches is None else tuple(new_caches)

    def init_caches(self) -> tuple:
        """Empty ring-buffer caches of the last `context - 1` tokens: with the new token that
        is the `context` the model was trained on, and decoding can go on for ever."""
        window = self.context - 1
        return tuple(block.attention.init_sliding_window_cache(window) for block in self.blocks)


# ------------------------------------------------------------------------------------------
# Training


def loss_fn(model: CharTransformer, inputs, targets, key: PRNGKeyArray) -> Float[Array, ""]:
    keys = jax.random.split(key, inputs.shape[0])
    logits, _ = jax.vmap(lambda tokens, k: model(tokens, key=k))(inputs, keys)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(weight_decay: float) -> optax.GradientTransformation:
    # The learning rate follows wall-clock progress (see `learning_rate`), so it is applied in
    # `train_step` rather than as an optax schedule: AdamW at rate 1, then scaled.
    decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1.0, b1=0.9, b2=0.99, weight_decay=weight_decay, mask=decay_matrices),
    )


@eqx.filter_jit
def train_step(optimizer, model, opt_state, inputs, targets, lr, key):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, inputs, targets, key)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    updates = jax.tree.map(lambda u: lr * u, updates)
    return eqx.apply_updates(model, updates), opt_state, loss


def learning_rate(peak: float, progress: float, warmup: float = 0.03, floor: float = 0.1):
    """Linear warmup over the first `warmup` of training, then cosine decay to `floor * peak`.

    `progress` is the fraction of the budget used: of `--steps` or of `--minutes`, whichever
    is further along, so the decay ends when training does whichever budget runs out.
    """
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
    return peak * (floor + (1 - floor) * cosine)


@eqx.filter_jit
def _eval_batch(model, inputs, targets, weights):
    logits, _ = jax.vmap(model)(inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights)


def bits_per_char(model: CharTransformer, data: np.ndarray, batch: int) -> float:
    """Mean negative log2-likelihood over `data`, cut into non-overlapping context windows."""
    length = model.context
    num_windows = -(-(len(data) - 1) // length)
    padded = np.zeros(num_windows * length + 1, np.int32)
    padded[: len(data)] = data
    weights = np.zeros(num_windows * length, np.float32)
    weights[: len(data) - 1] = 1.0
    inputs = padded[:-1].reshape(num_windows, length)
    targets = padded[1:].reshape(num_windows, length)
    weights = weights.reshape(num_windows, length)
    # Pad to whole batches so every call has the same shape and compiles once.
    pad = -num_windows % batch
    inputs, targets, weights = (np.pad(a, ((0, pad), (0, 0))) for a in (inputs, targets, weights))
    total = 0.0
    for i in range(0, len(inputs), batch):
        s = slice(i, i + batch)
        total += float(_eval_batch(model, inputs[s], targets[s], weights[s]))
    return total / (len(data) - 1) / math.log(2)


def train(model, corpus: Corpus, args, key: PRNGKeyArray):
    """Train until `args.steps` or `args.minutes` runs out; returns the model and a history.

    `key` draws the dropout masks: one key per step, folded in from it."""
    optimizer = make_optimizer(args.weight_decay)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    rng = np.random.default_rng(args.seed)
    budget = args.minutes * 60 if args.minutes > 0 else math.inf
    tokens_per_step = args.batch * model.context
    history = {"step": [], "loss": [], "valid_step": [], "valid": []}
    eval_points = iter([0.25, 0.5, 0.75])
    next_eval = next(eval_points)

    # Compile outside the time budget (the result of this step is thrown away).
    inputs, targets = sample_batch(rng, corpus.train, args.batch, model.context)
    compiled = time.perf_counter()
    warm_up = train_step(optimizer, model, opt_state, inputs, targets, jnp.float32(0), key)
    jax.block_until_ready(warm_up)
    print(f"compiled the training step in {time.perf_counter() - compiled:.1f} s")

    trained = 0.0  # seconds spent in training steps, excluding validation
    step = 0
    progress = 0.0
    bar_format = "train {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}"
    with tqdm(total=1.0, bar_format=bar_format, file=sys.stdout) as bar:
        while progress < 1.0:
            # An array, not a Python float: eqx.filter_jit would recompile for every value.
            lr = jnp.asarray(learning_rate(args.lr, progress), jnp.float32)
            step_key = jax.random.fold_in(key, step)
            start = time.perf_counter()
            model, opt_state, loss = train_step(
                optimizer, model, opt_state, inputs, targets, lr, step_key
            )
            inputs, targets = sample_batch(rng, corpus.train, args.batch, model.context)
            loss = float(loss)  # waits for the step, so the timing below is honest
            trained += time.perf_counter() - start
            step += 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; try a lower --lr")
            history["step"].append(step)
            history["loss"].append(loss)
            new_progress = min(1.0, max(step / args.steps, trained / budget))
            bar.update(new_progress - progress)
            progress = new_progress
            bar.set_postfix(
                step=step,
                loss=f"{loss:.3f}",
                tokens_per_s=f"{step * tokens_per_step / trained:,.0f}",
                refresh=False,
            )
            if progress >= next_eval:
                history["valid_step"].append(step)
                history["valid"].append(bits_per_char(model, corpus.valid, args.batch))
                next_eval = next(eval_points, math.inf)
    history["valid_step"].append(step)
    history["valid"].append(bits_per_char(model, corpus.valid, args.batch))
    history["seconds"] = trained
    history["tokens_per_s"] = step * tokens_per_step / trained
    return model, history


# ------------------------------------------------------------------------------------------
# Generation


@eqx.filter_jit
def _prefill(model, prompt, caches, key, temperature):
    logits, caches = model(prompt, caches)
    return _sample(logits[-1], key, caches[0].length, temperature), caches


# The caches are donated, so each step writes its token into them in place instead of
# copying them. Everything else (the model, the sampling key, and the token, which the caller
# keeps) rides in the first argument, the one not donated.
@eqx.filter_jit(donate="all-except-first")
def _cached_step(kept, caches, temperature):
    model, key, token = kept
    logits, caches = model(token[None], caches)
    return _sample(logits[0], key, caches[0].length, temperature), caches


@eqx.filter_jit
def _recompute_step(model, tokens, position, key, temperature):
    begin = jnp.maximum(position - model.context, 0)
    window = jax.lax.dynamic_slice_in_dim(tokens, begin, model.context)
    logits, _ = model(window)
    # Causal attention: the characters after `position - 1` in the window (zeros, or the
    # end of a short sequence) cannot change the logits read here.
    token = _sample(logits[position - begin - 1], key, position, temperature)
    return tokens.at[position].set(token)


def _sample(logits, key, position, temperature):
    # One key per position, so decoding with and without the cache samples alike.
    key = jax.random.fold_in(key, position)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


def generate_cached(model, prompt: np.ndarray, length: int, key, temperature: float):
    """Prefill the caches with the prompt, then one jitted step per new character.

    Every step has the same shapes (one token, fixed-size caches), so it compiles once.
    Returns the `length` new tokens and the decoding speed in tokens/s, not counting the
    prefill and the first step (which compiles).
    """
    caches = model.init_caches()
    token, caches = _prefill(model, jnp.asarray(prompt), caches, key, temperature)
    out = [token]
    token, caches = _cached_step((model, key, token), caches, temperature)
    out.append(token)
    start = time.perf_counter()
    for _ in range(length - 2):
        token, caches = _cached_step((model, key, token), caches, temperature)
        out.append(token)
    tokens = np.array(jax.device_get(out))
    return tokens, (length - 2) / (time.perf_counter() - start)


def generate_recomputing(model, prompt: np.ndarray, length: int, key, temperature: float):
    """Decode without a cache: run the model on the last `context` characters for every
    new one. Returns the new tokens and tokens/s (not counting the first, compiling step)."""
    # Zeros after the sequence keep every window in bounds, so the step has one shape.
    tokens = jnp.zeros(len(prompt) + length + model.context, jnp.int32)
    tokens = tokens.at[: len(prompt)].set(jnp.asarray(prompt))
    # NumPy scalars are traced by eqx.filter_jit (a Python int would be static: a recompile
    # per position).
    positions = np.arange(len(prompt), len(prompt) + length, dtype=np.int32)
    tokens = _recompute_step(model, tokens, positions[0], key, temperature)
    start = time.perf_counter()
    for position in positions[1:]:
        tokens = _recompute_step(model, tokens, position, key, temperature)
    tokens = np.array(tokens[len(prompt) : len(prompt) + length])
    return tokens, (length - 1) / (time.perf_counter() - start)


@eqx.filter_jit
def attention_weights(
    model: CharTransformer, tokens: Int[Array, " seq"]
) -> Float[Array, "heads seq seq"]:
    """The last block's attention probabilities on `tokens`, `(heads, seq, seq)`."""
    x = model.embedding.weight[tokens]
    for block in model.blocks[:-1]:
        x, _ = block(x)
    block = model.blocks[-1]
    h = jax.vmap(block.attention_norm)(x)
    attention = block.attention
    if isinstance(attention, EquinoxAttention):
        # Equinox cannot return its weights: recompute its heads, then use the library's.
        mha = attention.mha
        q = jax.vmap(mha.query_proj)(h).reshape(len(tokens), mha.num_heads, -1)
        k = jax.vmap(mha.key_proj)(h).reshape(len(tokens), mha.num_heads, -1)
        q, k, _ = attention.process_heads(q, k, k)
        return ea.dot_product_attention_weights(q, k, is_causal=True)
    _, weights = attention(h, is_causal=True, return_weights=True)
    return weights


# ------------------------------------------------------------------------------------------
# Plots


def plot_losses(history: dict, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bits = np.array(history["loss"]) / math.log(2)
    smooth = np.convolve(bits, np.ones(20) / 20, mode="valid") if len(bits) > 40 else bits
    ax.plot(history["step"], bits, color="C0", alpha=0.25, lw=0.8)
    ax.plot(history["step"][len(bits) - len(smooth) :], smooth, color="C0", label="training")
    ax.plot(history["valid_step"], history["valid"], "o-", color="C1", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/char")
    ax.set_ylim(top=min(ax.get_ylim()[1], 5.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(weights: np.ndarray, text: str, path: pathlib.Path, title: str):
    """One panel per head: which earlier characters each character attends to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_heads = weights.shape[0]
    cols = min(num_heads, 4)
    rows = -(-num_heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    labels = [repr(c)[1:-1] for c in text]
    for h, ax in enumerate(axes.flat):
        if h >= num_heads:
            ax.axis("off")
            continue
        ax.imshow(weights[h], cmap="viridis", vmin=0.0)
        ax.set_title(f"head {h}")
        ax.set_xticks(range(len(text)), labels, fontsize=5, family="monospace")
        ax.set_yticks(range(len(text)), labels, fontsize=5, family="monospace")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attention", choices=["eqx_attention", "equinox"], default="eqx_attention")
    # About six passes over the corpus: past them the model overfits (on a machine fast
    # enough to train longer in the time budget, validation loss rises again).
    p.add_argument("--steps", type=int, default=1100, help="stop after this many steps")
    p.add_argument("--minutes", type=float, default=3.0, help="or this much training; 0: none")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.0, help="on the residual branches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    p.add_argument("--resume", action="store_true", help="keep training --out's checkpoint")
    p.add_argument("--generate-only", action="store_true", help="sample from the checkpoint")
    p.add_argument("--prompt", default="The for statement is used to ")
    p.add_argument("--generate", type=int, default=400, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.7)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the example; returns what it printed, as numbers, for tests and notebooks."""
    args = parse_args(argv)
    corpus = load_corpus()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "model.eqx"
    config_path = args.out / "config.json"
    model_key, dropout_key, sample_key = jax.random.split(jax.random.key(args.seed), 3)

    if args.resume or args.generate_only:
        if not checkpoint.exists():
            raise FileNotFoundError(f"no checkpoint at {checkpoint}; train one first")
        # The checkpoint's config, not the command line, decides the architecture.
        config = Config(**json.loads(config_path.read_text()))
        if config.vocab != corpus.vocab:
            raise ValueError(
                f"{checkpoint} was trained on another Python's help topics: vocabulary "
                f"{config.vocab!r} != {corpus.vocab!r}"
            )
    else:
        config = Config(
            corpus.vocab, args.attention, args.layers, args.width, args.heads, args.kv_heads,
            args.context, args.dropout,
        )  # fmt: skip
    # Jitted, the initialisation compiles once instead of dispatching op by op: faster.
    model = eqx.filter_jit(CharTransformer)(config, key=model_key)
    if args.resume or args.generate_only:
        model = eqx.tree_deserialise_leaves(checkpoint, model)
        print(f"loaded {checkpoint}")
    num_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    print(
        f"data: {len(corpus.train):,} training and {len(corpus.valid):,} validation characters, "
        f"vocabulary of {len(corpus.vocab)}; held-out topics: {', '.join(corpus.valid_topics)}"
    )
    print(
        f"model: {num_params:,} parameters, {config.layers} layers of width {config.width}, "
        f"{config.heads} heads, context {config.context}, attention from {config.attention}"
    )

    result = {"config": dataclasses.asdict(config)}
    if not args.generate_only:
        model, history = train(model, corpus, args, dropout_key)
        eqx.tree_serialise_leaves(checkpoint, model)
        config_path.write_text(json.dumps(dataclasses.asdict(config), indent=1))
        plot_losses(history, args.out / "loss.png")
        result.update(history)
        print(
            f"trained {history['step'][-1]} steps in {history['seconds']:.0f} s at "
            f"{history['tokens_per_s']:,.0f} tokens/s"
        )
        print(f"validation bits/char: {history['valid'][-1]:.3f}")

    prompt = corpus.encode(args.prompt)
    if config.attention == "eqx_attention":
        tokens, cached_speed = generate_cached(
            model, prompt, args.generate, sample_key, args.temperature
        )
        result["cached_tokens_per_s"] = cached_speed
    else:
        cached_speed = None
    recomputed, recompute_speed = generate_recomputing(
        model, prompt, args.generate, sample_key, args.temperature
    )
    if cached_speed is None:
        tokens = recomputed
    result["recompute_tokens_per_s"] = recompute_speed
    result["sample"] = corpus.decode(tokens)
    print("-" * 80)
    print(args.prompt + result["sample"])
    print("-" * 80)
    if cached_speed is not None:
        print(
            f"decoding: {cached_speed:,.0f} tokens/s with the KV cache, "
            f"{recompute_speed:,.0f} tokens/s recomputing the {config.context}-character "
            f"context ({cached_speed / recompute_speed:.1f}x)"
        )
    else:
        print(f"decoding: {recompute_speed:,.0f} tokens/s recomputing the context (no KV cache)")

    # A held-out sentence of prose (not a heading or a grammar rule) reads best in the map.
    paragraphs = corpus.decode(corpus.valid).split("\n\n")
    text = next(p for p in paragraphs if len(p) > 200 and p[0].isupper() and p.isascii())[:64]
    weights = np.asarray(attention_weights(model, jnp.asarray(corpus.encode(text))))
    plot_attention(weights, text, args.out / "attention.png", "last layer, validation text")
    print(f"wrote {checkpoint}, {args.out / 'loss.png'} and {args.out / 'attention.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

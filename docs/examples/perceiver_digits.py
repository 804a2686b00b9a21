"""A Perceiver IO classifier on scikit-learn's 8x8 handwritten digits.

```bash
.venv/bin/python docs/examples/perceiver_digits.py               # seeds 0 1 2, about a minute each
.venv/bin/python docs/examples/perceiver_digits.py --seeds 0 --out /tmp/digits
```

The data set is `sklearn.datasets.load_digits` (1797 real 8x8 images bundled with
scikit-learn, nothing is downloaded). Every seed draws its own stratified 80/20 split and
trains a fresh model. Each pixel is a token: the grey levels of its 3x3 neighbourhood next to
the Fourier features of its (row, column) position ([`eqx_attention.Encoding`][] with a
[`eqx_attention.FourierPositionEncoding`][]). A [`eqx_attention.PerceiverEncoder`][]'s latents
cross-attend to the 64 pixel tokens and self-attend; one learned query decodes the class
([`eqx_attention.PerceiverDecoder`][]). Training shifts each image by up to one pixel at
random. The last line printed is `test accuracy: mean X min Y` over the seeds; `--out` gets
`digits_training.png` (loss and test accuracy per seed) and `digits_attention.png` (where
some latents look on a few test digits).
"""

import argparse
import dataclasses
import functools
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray
from tqdm import tqdm

import eqx_attention as ea

IMAGE_SHAPE = (8, 8)
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    num_bands: int = 4
    num_latents: int = 16
    latent_size: int = 64
    num_blocks: int = 1
    cross_heads: int = 4
    cross_channels: int = 64
    decoder_heads: int = 4
    patch: int = 3
    self_attends: int = 2
    self_heads: int = 4
    max_shift: int = 1
    eval_every: int = 150


# ------------------------------------------------------------------------------------------
# Data


def load_split(seed: int):
    """Stratified 80/20 split of the digits, grey levels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # (n, 8, 8, 1)
    return train_test_split(
        images, digits.target.astype(np.int32), test_size=0.2, stratify=digits.target,
        random_state=seed,
    )  # fmt: skip


def random_shift(image: Float[Array, "8 8 1"], key: PRNGKeyArray, max_shift: int):
    """Translate by up to `max_shift` pixels along each axis, filling with background."""
    padded = jnp.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    start = jax.random.randint(key, (2,), 0, 2 * max_shift + 1)
    return jax.lax.dynamic_slice(padded, (start[0], start[1], 0), image.shape)


# ------------------------------------------------------------------------------------------
# Model


def neighbourhoods(image: Float[Array, "8 8 1"], patch: int) -> Float[Array, "8 8 patch2"]:
    """Each pixel's `patch x patch` neighbourhood (zero outside the image) as its channels."""
    r = patch // 2
    padded = jnp.pad(image[..., 0], r)
    shifts = [padded[i : i + 8, j : j + 8] for i in range(patch) for j in range(patch)]
    return jnp.stack(shifts, axis=-1)


def make_model(config: Config, key: PRNGKeyArray) -> ea.PerceiverIO:
    encoder_key, query_key, decoder_key = jax.random.split(key, 3)
    fourier = ea.FourierPositionEncoding(IMAGE_SHAPE, config.num_bands)
    pixels = ea.Encoding(
        functools.partial(neighbourhoods, patch=config.patch), positional_encoding=fourier
    )
    encoder = ea.PerceiverEncoder(
        config.patch**2 + fourier.num_channels,
        config.num_latents,
        config.latent_size,
        num_blocks=config.num_blocks,
        num_self_attends_per_block=config.self_attends,
        num_cross_heads=config.cross_heads,
        cross_qk_channels=config.cross_channels,
        cross_v_channels=config.cross_channels,
        num_self_heads=config.self_heads,
        key=encoder_key,
    )
    query = ea.TrainablePositionalEncoding(1, config.latent_size, key=query_key)
    decoder = ea.PerceiverDecoder(
        query, config.latent_size, NUM_CLASSES, num_heads=config.decoder_heads, key=decoder_key
    )
    return ea.PerceiverIO(encoder, decoder, pixels)


def logits(model: ea.PerceiverIO, image: Float[Array, "8 8 1"]) -> Float[Array, " 10"]:
    return model(image)[0]


def loss_fn(model, images, labels, smoothing: float):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, NUM_CLASSES), smoothing)
    return optax.softmax_cross_entropy(jax.vmap(logits, (None, 0))(model, images), targets).mean()


# Cached so that every seed gets the same optimizer object and reuses the compiled step.
@functools.cache
def make_optimizer(config: Config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(1, config.steps // 20), config.steps
    )
    return optax.adamw(schedule, weight_decay=config.weight_decay)


@eqx.filter_jit
def train_step(model, opt_state, images, labels, key, optimizer, config: Config):
    keys = jax.random.split(key, images.shape[0])
    images = jax.vmap(random_shift, (0, 0, None))(images, keys, config.max_shift)
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, images, labels, config.label_smoothing)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


@eqx.filter_jit
def accuracy(model, images, labels) -> Float[Array, ""]:
    predictions = jnp.argmax(jax.vmap(logits, (None, 0))(model, images), axis=-1)
    return jnp.mean(predictions == labels)


def train(config: Config, seed: int, progress: bool = True):
    """Train one model on one split; returns the model, test data and history."""
    x_train, x_test, y_train, y_test = load_split(seed)
    key = jax.random.key(seed)
    model_key, data_key = jax.random.split(key)
    model = make_model(config, model_key)
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    rng = np.random.default_rng(seed)
    history = {"loss": [], "eval_step": [], "test_accuracy": []}
    order = np.empty(0, dtype=np.int64)
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(config.steps), desc=f"seed {seed}", disable=not progress)
    for step in bar:
        if len(order) < config.batch_size:  # a new epoch: reshuffle
            order = rng.permutation(len(x_train))
        batch, order = order[: config.batch_size], order[config.batch_size :]
        model, opt_state, loss = train_step(
            model, opt_state, x_train[batch], y_train[batch], jax.random.fold_in(data_key, step),
            optimizer, config,
        )  # fmt: skip
        # Kept on device: converting every step would stall JAX's asynchronous dispatch.
        history["loss"].append(loss)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            acc = float(accuracy(model, x_test, y_test))
            history["eval_step"].append(step + 1)
            history["test_accuracy"].append(acc)
            bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{acc:.3f}")
    history["seconds"] = time.perf_counter() - start
    history["cpu_seconds"] = time.process_time() - cpu_start
    history["loss"] = np.asarray(jnp.stack(history["loss"]))
    return model, (x_test, y_test), history


# ------------------------------------------------------------------------------------------
# Plots


@eqx.filter_jit
def cross_attention(model: ea.PerceiverIO, image: Float[Array, "8 8 1"]) -> Array:
    """Cross-attention weights of the latents over the pixels, averaged over heads."""
    tokens = model.input_encoding(image)
    _, weights = model.encoder(tokens, inference=True, return_weights=True)
    return weights.mean(axis=0).reshape(-1, *IMAGE_SHAPE)


def plot_training(histories: dict[int, dict], path: pathlib.Path):
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for seed, h in histories.items():
        loss = h["loss"]
        window = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(np.arange(len(smooth)) + window - 1, smooth, label=f"seed {seed}")
        ax_acc.plot(h["eval_step"], h["test_accuracy"], marker="o", label=f"seed {seed}")
    ax_loss.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log")
    ax_acc.set(xlabel="step", ylabel="test accuracy", ylim=(0.8, 1.0))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(
    model: ea.PerceiverIO, images: np.ndarray, labels: np.ndarray, path: pathlib.Path, latents=8
):
    import matplotlib.pyplot as plt

    rows, latents = len(images), min(latents, model.encoder.latents.weight.shape[0])
    fig, axes = plt.subplots(rows, latents + 1, figsize=(1.3 * (latents + 1), 1.4 * rows))
    for r, image in enumerate(images):
        weights = np.asarray(cross_attention(model, jnp.asarray(image)))
        axes[r, 0].imshow(image[..., 0], cmap="gray_r")
        axes[r, 0].set_ylabel(f"digit {labels[r]}", fontsize=8)
        for j in range(latents):
            axes[r, j + 1].imshow(weights[j], cmap="viridis")
            if r == 0:
                axes[r, j + 1].set_title(f"latent {j}", fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("cross-attention of latents over the 8x8 pixels", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv):
    defaults = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    p.add_argument("--no-plots", action="store_true", help="skip writing the PNGs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        p.add_argument(flag, type=field.type, default=getattr(defaults, field.name))
    return p.parse_args(argv)


def main(argv=None) -> dict[int, dict]:
    """Run the example; returns each seed's training history (for tests and notebooks)."""
    args = parse_args(argv)
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    histories, last_model, last_test = {}, None, None
    for seed in args.seeds:
        last_model, last_test, histories[seed] = train(config, seed, not args.no_progress)
        h = histories[seed]
        print(
            f"seed {seed}: test accuracy {h['test_accuracy'][-1]:.4f}, trained in "
            f"{h['seconds']:.1f} s ({h['cpu_seconds']:.1f} s of CPU time)"
        )
    accs = [h["test_accuracy"][-1] for h in histories.values()]
    print(f"test accuracy: mean {np.mean(accs):.4f} min {np.min(accs):.4f}")
    if not args.no_plots:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_training(histories, args.out / "digits_training.png")
        x_test, y_test = last_test
        digits = np.array([0, 3, 7])
        examples = np.stack([x_test[np.flatnonzero(y_test == d)[0]] for d in digits])
        plot_attention(last_model, examples, digits, args.out / "digits_attention.png")
    return histories


if __name__ == "__main__":
    main()

"""The training loop's Task (task.py) for the seed's AutoencodingEngine / AutoencoderKL: state,
the jitted step (sgm_jax.autoencoding), grids of inputs above their reconstructions, held-out
reconstruction metrics.

sgm_jax-only knobs: `config.data.pad_to` (pad images with the background value -1 to a
square of this side, e.g. MNIST 28 -> 32 for an 8x8 latent at f4; the loaders are not
touched), `config.training.optimizer_order` (step.py), `config.training.eval_examples`,
`config.training.lpips_train_dropout` (the seed trains with LPIPS' dropout on).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import data, multihost
from sgm_jax.autoencoding.engine import (
    AutoencoderState,
    build_parts,
    init_state,
    logvar_of,
)
from sgm_jax.autoencoding.lpips import find_lpips_weights, load_lpips_params
from sgm_jax.autoencoding.step import make_train_step, reconstruct
from sgm_jax.images import legible_scale, make_grid
from sgm_jax.nn.lpips import LPIPS

from .task import Task


def pad_images(images: Any, size: int) -> Any:
    """`[B, H, W, C]` -> `[B, size, size, C]`, centred, padded with -1 (black in [-1, 1])."""
    h, w = images.shape[1:3]
    if size <= 0 or (h, w) == (size, size):
        return images
    if h > size or w > size:
        raise ValueError(f"data.pad_to {size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    xp = jnp if isinstance(images, jax.Array) else np
    return xp.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)), constant_values=-1.0)


class AutoencoderTask(Task):
    """Trains the autoencoder (optimizer 0) and the PatchGAN discriminator (optimizer 1)."""

    name = "autoencoder"

    def __init__(self, config: Any, dataset: Any, lpips_params: Any = None):
        """lpips_params: LPIPS weights to use instead of the converted files (the compile check's
        random stand-in of the same shapes)."""
        super().__init__(config, dataset)
        self.parts = build_parts(config)
        self.pad_to = int(config.data.get("pad_to", 0) or 0)
        self.perceptual = None
        self._lpips_params = None
        if self.parts.loss.perceptual_weight > 0:  # stops here, with one line, when the weights are absent
            self._lpips_params = load_lpips_params() if lpips_params is None else lpips_params
            self.perceptual = self._perceptual_fn(self._lpips_params, bool(config.training.lpips_train_dropout))
        self._step = make_train_step(self.parts, self.perceptual)
        self._eval_set: np.ndarray | None = None
        self._jit_eval = None

    @staticmethod
    def _perceptual_fn(params: Any, train_dropout: bool):
        net = LPIPS()
        return lambda a, b, key=None: net.apply({"params": params}, a, b, key if train_dropout else None)

    def images(self, batch: Mapping[str, Any]) -> Any:
        return pad_images(batch[self.parts.input_key], self.pad_to)

    def init_state(self, key: jax.Array, example_batch: Mapping[str, Any]) -> AutoencoderState:
        return init_state(self.parts, key, jnp.asarray(self.images(example_batch), jnp.float32))

    def train_step(self, state: AutoencoderState, batch: Mapping[str, Any], key: jax.Array, frozen: Any = None):
        return self._step(state, {self.parts.input_key: self.images(batch)}, key)

    def first_stage_params(self, state: AutoencoderState) -> Any:
        """The weights a latent model uses: the EMA when kept, else the trained ones."""
        return state.ema_params if state.ema_params is not None else state.params["autoencoder"]

    # ------------------------------------------------------------------ grids

    def log_images(self, state: AutoencoderState, step: int) -> dict[str, Any]:
        tc = self.config.training
        n, nrow = int(tc.num_samples), int(tc.sample_nrow)
        x = np.asarray(self.images(self.dataset.example_batch(n)), np.float32)
        rec, _ = jax.jit(lambda p, x: reconstruct(self.parts, p, x))(self.first_stage_params(state), x)
        rec = np.clip(multihost.to_host(rec), -1.0, 1.0)
        rows = []  # each row of inputs, then the same row reconstructed
        for start in range(0, len(x), nrow):
            rows += [x[start:start + nrow], rec[start:start + nrow]]
        return {"": make_grid(np.concatenate(rows), nrow, scale=legible_scale(x.shape[1]))}

    # ------------------------------------------------------------------ held-out metrics

    def _held_out(self) -> np.ndarray:
        if self._eval_set is None:
            n = int(self.config.training.eval_examples)
            try:
                test = data.from_config(self.config.data, split="test")
            except (ValueError, KeyError, FileNotFoundError):
                test = self.dataset  # no test split here: the first examples of the training data
            self._eval_set = np.asarray(self.images(test.example_batch(n)), np.float32)
        return self._eval_set

    def _eval_fn(self):
        if self._jit_eval is None:
            import dm_pix

            parts = self.parts
            lpips_dir = find_lpips_weights()
            lpips_params = self._lpips_params
            if lpips_params is None and lpips_dir is not None:
                lpips_params = load_lpips_params(lpips_dir)
            perceptual = None if lpips_params is None else self._perceptual_fn(lpips_params, False)

            def metrics(ae_params, disc_vars, logvar, x):
                rec, posterior = reconstruct(parts, ae_params, x)
                rec = jnp.clip(rec, -1.0, 1.0)
                x01, rec01 = (x + 1.0) / 2.0, (rec + 1.0) / 2.0
                out = {"l1": jnp.mean(jnp.abs(x - rec)),
                       "psnr": jnp.mean(dm_pix.psnr(x01, rec01)),
                       "ssim": jnp.mean(dm_pix.ssim(x01, rec01)),
                       "kl": jnp.mean(posterior.kl())}
                if perceptual is not None:
                    out["lpips"] = jnp.mean(perceptual(x, rec))
                # the seed's validation runs the discriminator in eval mode (running statistics)
                real = parts.discriminator.apply(disc_vars, x, train=False)
                fake = parts.discriminator.apply(disc_vars, rec, train=False)
                out.update({"logits_real": jnp.mean(real), "logits_fake": jnp.mean(fake), "logvar": logvar})
                return out

            self._jit_eval = jax.jit(metrics)
        return self._jit_eval

    def evaluate(self, state: AutoencoderState, step: int) -> dict[str, float]:
        """Held-out L1, PSNR (dB), SSIM on [0, 1] images, KL per example, LPIPS (when its weights
        exist) and discriminator logits, for the trained weights and (`ema/`) their EMA."""
        x_all, fn = self._held_out(), self._eval_fn()
        batch = int(self.config.training.eval_batch_size)
        disc_vars = {"params": state.disc_params, "batch_stats": state.disc_batch_stats}
        logvar = logvar_of(self.parts, state.params)
        weights = {"": state.params["autoencoder"]}
        if state.ema_params is not None:
            weights["ema/"] = state.ema_params
        out: dict[str, float] = {}
        for prefix, params in weights.items():
            sums: dict[str, float] = {}
            for start in range(0, len(x_all), batch):
                x = x_all[start:start + batch]
                for k, v in multihost.to_host(fn(params, disc_vars, logvar, x)).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(x)
            out.update({prefix + k: v / len(x_all) for k, v in sums.items()})
        return out

"""CLIP's image tower (ViT; ViT-L/14 by default) in the openai / open_clip layout, in Flax.

Params (one per torch tensor of `visual.*` in OpenAI's `ViT-L-14.pt` and open_clip):
`conv1` (patch embedding, no bias), `class_embedding` `[W]`, `positional_embedding` `[N+1, W]`,
`ln_pre`, `transformer/resblocks_i/{ln_1, attn/{in_proj, out_proj}, ln_2, mlp/{c_fc, c_proj}}`,
`ln_post`, `proj` `[W, embed_dim]` (used as x @ proj). Attention is bidirectional, the
activation OpenAI's QuickGELU (open_clip's non-OpenAI weights use exact GELU: `act="gelu"`).

`CLIPVisionTower()(pixels)`: pixels `[B, S, S, 3]` already CLIP-normalised (see
`preprocess`) -> image embeddings `[B, embed_dim]` (not L2-normalised), equal to transformers'
`CLIPVisionModelWithProjection(...).image_embeds`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.nn.text import OpenCLIPTransformer, _layer_norm

Dtype = Any
# OpenAI CLIP's pixel statistics (also transformers' CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_L_14 = dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, embed_dim=768)


class CLIPVisionTower(nn.Module):
    """`[B, image_size, image_size, 3]` normalised pixels -> `[B, embed_dim]` image embeddings."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    embed_dim: int = 768
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        if pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"CLIP image tower expects {self.image_size}x{self.image_size} pixels, got "
                             f"{pixels.shape[1]}x{pixels.shape[2]} (use sgm_jax.nn.clip_vision.preprocess)")
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), (p, p), "VALID", use_bias=False, dtype=self.dtype, name="conv1")(
            pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.width)
        init = nn.initializers.normal(self.width ** -0.5)
        cls = self.param("class_embedding", init, (self.width,))
        pos = self.param("positional_embedding", init, ((self.image_size // p) ** 2 + 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x], axis=1)
        x = _layer_norm("ln_pre", self.layer_norm_eps)(x + pos).astype(self.dtype)
        x = OpenCLIPTransformer(self.width, self.heads, self.layers, self.mlp_ratio, self.dtype, self.act,
                                causal=False, name="transformer")(x, self.layers)[-1]
        pooled = _layer_norm("ln_post", self.layer_norm_eps)(x[:, 0])
        proj = self.param("proj", init, (self.width, self.embed_dim))
        return (pooled @ proj).astype(jnp.float32)


def preprocess(images: jax.Array, image_size: int = 224) -> jax.Array:
    """float `[B, H, W, 3]` in [0, 1] -> CLIP input `[B, image_size, image_size, 3]`: bicubic
    resize of the shorter side to `image_size` (antialiased), centre crop, CLIP normalisation.

    transformers' CLIPImageProcessor (what torchmetrics' CLIPScore uses) does the same with PIL,
    which resizes and rounds in uint8: on scikit-image's photographs the normalised pixels differ
    by 0.004 on average (tests/test_evaluation.py), so scores are close to torchmetrics', not
    bit-identical.
    """
    b, h, w, c = images.shape
    scale = image_size / min(h, w)
    nh, nw = max(image_size, int(h * scale)), max(image_size, int(w * scale))  # floor, as transformers
    x = jax.image.resize(images.astype(jnp.float32), (b, nh, nw, c), "bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def abstract_vision_params(tower: CLIPVisionTower) -> dict[str, Any]:
    """The tower's params tree as ShapeDtypeStructs (shapes only)."""
    x = jax.ShapeDtypeStruct((1, tower.image_size, tower.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: tower.init(jax.random.key(0), x), x)["params"]


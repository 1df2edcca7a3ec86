"""CLIP score as torchmetrics' `CLIPScore` defines it: 100 * max(cos(image_embed, text_embed), 0),
averaged over the image-prompt pairs, with CLIP ViT-L/14 (`openai/clip-vit-large-patch14`).

Image embeddings: `CLIPVisionTower` on `sgm_jax.nn.clip_vision.preprocess`ed images. Text embeddings:
transformers' CLIPTextModel (`sgm_jax.nn.text.CLIPTextTransformer`) pooled at the eot token,
times `text_projection`. Prompts longer than 77 tokens are cut (torchmetrics does the same).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.convert.clip_vision import (
    convert_clip_text,
    convert_clip_vision,
    open_clip_checkpoint,
)
from sgm_jax.evaluation.fid import prepare_images
from sgm_jax.nn.clip_vision import VIT_L_14, CLIPVisionTower, preprocess
from sgm_jax.nn.text import CLIPTextTransformer


def clip_score_from_embeddings(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """`[N, E]`, `[N, E]` -> per-pair scores `[N]`: 100 * max(cos, 0)."""
    img = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    txt = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return jnp.maximum(100.0 * jnp.sum(img * txt, axis=-1), 0.0)


def text_embeddings(text_model: CLIPTextTransformer, params: Mapping[str, Any], tokens: jax.Array) -> jax.Array:
    """int32 tokens `[N, 77]` -> `[N, E]`: pooled output @ text_projection."""
    pooled = text_model.apply({"params": params["transformer"]}, tokens)["pooler_output"]
    return pooled.astype(jnp.float32) @ params["text_projection"]


class CLIPScore:
    """`score(images, prompts) -> float` (and `per_image(...) -> [N]`).

    params: {"vision": CLIPVisionTower params, "text": {"transformer", "text_projection"}}
    (see `load_clip_score_params`); tokenizer: a CLIP tokenizer (`sgm_jax.nn.tokenizer`).
    Images: uint8 (0..255) or float (-1..1) `[N, H, W, 1|3]`.
    """

    def __init__(self, params: Mapping[str, Any], tokenizer: Any, vision: CLIPVisionTower | None = None,
                 text: CLIPTextTransformer | None = None, batch_size: int = 32):
        self.params, self.tokenizer, self.batch_size = params, tokenizer, int(batch_size)
        self.vision = vision or CLIPVisionTower(**VIT_L_14)
        self.text = text or CLIPTextTransformer()
        size = self.vision.image_size
        self._image_fn = jax.jit(lambda p, x: self.vision.apply({"params": p}, preprocess(x, size)))
        self._text_fn = jax.jit(lambda p, t: text_embeddings(self.text, p, t))

    def per_image(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        # transformers is heavy and, without torch, prints a line on import: only text models need it
        from sgm_jax.nn.tokenizer import tokenize

        if len(prompts) != len(images):
            raise ValueError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
        scores = []
        for start in range(0, len(images), self.batch_size):
            img = self._image_fn(self.params["vision"], prepare_images(images[start:start + self.batch_size]))
            tokens = tokenize(self.tokenizer, list(prompts[start:start + self.batch_size]), self.text.max_length)
            txt = self._text_fn(self.params["text"], tokens)
            scores.append(np.asarray(clip_score_from_embeddings(img, txt)))
        return np.concatenate(scores)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> float:
        return float(np.mean(self.per_image(images, prompts)))


def load_clip_score_params(path: str | None = None, vision: CLIPVisionTower | None = None,
                           text: CLIPTextTransformer | None = None) -> dict[str, Any]:
    """Both towers from transformers' CLIPModel checkpoint of openai/clip-vit-large-patch14
    (a file or folder; None: `sgm_jax.convert.clip_vision.default_weight_paths()`)."""

    checkpoint = open_clip_checkpoint(path)
    return {"vision": convert_clip_vision(checkpoint, vision or CLIPVisionTower(**VIT_L_14)),
            "text": convert_clip_text(checkpoint, text or CLIPTextTransformer())}


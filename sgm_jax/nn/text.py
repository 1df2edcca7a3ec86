"""Text encoders of the seed's conditioner: CLIP ViT-L/14 (transformers' CLIPTextModel layout)
and the OpenCLIP text tower (ViT-H-14 for SD 2.x, ViT-bigG-14 for SDXL), plus the seed's
embedders FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2 and FrozenOpenCLIPEmbedder.

Embedders take int32 token ids `[B, T]` (T = 77; tokenisation happens outside jit, see
`sgm_jax.nn.tokenizer`) and return `[B, T, width]` (plus pooled `[B, D]` when asked).
Module names mirror the PyTorch state dicts (`layers_3` is `layers.3`), one Flax param per
torch tensor, so `sgm_jax.convert.text` maps keys mechanically. Params are float32; `dtype`
is the compute dtype; layer norms always run in float32.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


def _layer_norm(name: str | None = None, epsilon: float = 1e-5) -> nn.LayerNorm:
    # Params `scale`, `bias`; statistics in float32 (two-pass variance, like torch). The
    # output is float32: callers cast to the compute dtype.
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=jnp.float32, name=name)


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, causal: bool = True) -> jax.Array:
    """`[B, T, W]` q, k, v -> multi-head attention `[B, T, W]` (scale head_dim^-0.5), causal for text."""
    b, t, w = q.shape
    split = lambda a: a.reshape(b, t, heads, w // heads)
    return jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=causal).reshape(b, t, w)


# CLIP (transformers CLIPTextModel layout).


class CLIPAttention(nn.Module):
    """Params `q_proj`, `k_proj`, `v_proj`, `out_proj` (Dense with bias). `[B,T,W]` -> `[B,T,W]`."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(self.width, dtype=self.dtype, name=name)
        out = _causal_attention(dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x), self.heads)
        return dense("out_proj")(out)


class CLIPMLP(nn.Module):
    """fc1 -> act -> fc2."""

    width: int
    intermediate_size: int
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _ACTIVATIONS[self.act](nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.width, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    width: int
    heads: int
    intermediate_size: int
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _layer_norm("layer_norm1")(x).astype(self.dtype)
        x = x + CLIPAttention(self.width, self.heads, self.dtype, name="self_attn")(h)
        h = _layer_norm("layer_norm2")(x).astype(self.dtype)
        return x + CLIPMLP(self.width, self.intermediate_size, self.act, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """`layers_0 .. layers_{L-1}`. Returns the hidden states after each of the first
    `num_run` blocks, preceded by the input (transformers' `hidden_states` tuple)."""

    width: int
    heads: int
    layers: int
    intermediate_size: int
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, num_run: int) -> list[jax.Array]:
        hidden = [x]
        for i in range(self.layers):
            # Blocks past `num_run` are only built at init so the params tree always holds
            # every block of the checkpoint.
            if i < num_run or self.is_initializing():
                layer = CLIPEncoderLayer(self.width, self.heads, self.intermediate_size, self.act, self.dtype,
                                         name=f"layers_{i}")
                x = layer(x)
                hidden.append(x)
        return hidden[: num_run + 1]


class CLIPEmbeddings(nn.Module):
    """token_embedding `[V, W]` + position_embedding `[max_length, W]` (positions 0..T-1)."""

    vocab_size: int
    width: int
    max_length: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        tok = nn.Embed(self.vocab_size, self.width, name="token_embedding")(input_ids)
        pos = nn.Embed(self.max_length, self.width, name="position_embedding").embedding
        return (tok + pos[: input_ids.shape[1]]).astype(self.dtype)


class CLIPTextTransformer(nn.Module):
    """transformers' CLIPTextModel: params `embeddings`, `encoder`, `final_layer_norm`.

    `__call__(input_ids [B, T], num_run=None)` -> dict with `hidden_states` (list, length
    num_run + 1), and when all blocks ran: `last_hidden_state` `[B, T, W]` (final LN) and
    `pooler_output` `[B, W]` (final-LN state at argmax(input_ids), i.e. the eot token as in
    the real CLIP-L config whose eos_token_id=2).
    """

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_length: int = 77
    intermediate_size: int | None = None  # default 4 * width
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, num_run: int | None = None) -> dict[str, Any]:
        num_run = self.layers if num_run is None else num_run
        x = CLIPEmbeddings(self.vocab_size, self.width, self.max_length, self.dtype, name="embeddings")(input_ids)
        inter = self.intermediate_size or 4 * self.width
        encoder = CLIPEncoder(self.width, self.heads, self.layers, inter, self.act, self.dtype, name="encoder")
        out: dict[str, Any] = {"hidden_states": encoder(x, num_run)}
        if num_run == self.layers or self.is_initializing():
            final_ln = _layer_norm("final_layer_norm", self.layer_norm_eps)
            last = final_ln(out["hidden_states"][-1].astype(jnp.float32))
            out["last_hidden_state"] = last.astype(self.dtype)
            out["pooler_output"] = _at_eot(last, input_ids).astype(self.dtype)
        return out


def _at_eot(x: jax.Array, input_ids: jax.Array) -> jax.Array:
    """`x[b, argmax(input_ids[b])]`: the eot token has the largest id in the vocab."""
    idx = jnp.argmax(input_ids, axis=-1)
    return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]


class FrozenCLIPEmbedder(nn.Module):
    """The seed's FrozenCLIPEmbedder (CLIP ViT-L/14 text model under `transformer`).

    layer: "last" -> last_hidden_state; "pooled" -> pooler_output[:, None]; "hidden" ->
    hidden_states[layer_idx] (SDXL: layer_idx=11, the input of the 12th block, no final LN).
    Returns z `[B, T, W]` (or `[B, 1, W]`), or (z, pooled `[B, W]`) with always_return_pooled.
    Token ids are padded with eot (`pad_token = "eot"`).
    """

    pad_token: ClassVar[str | int] = "eot"
    LAYERS: ClassVar[tuple[str, ...]] = ("last", "pooled", "hidden")

    layer: str = "last"
    layer_idx: int | None = None
    always_return_pooled: bool = False
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_length: int = 77
    intermediate_size: int | None = None
    act: str = "quick_gelu"
    version: str | None = None  # the seed's HF model id; informational (weights come from a checkpoint)
    freeze: bool = True  # informational: freezing is the trainer's business
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        if self.layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {self.layer!r}")
        idx = None
        if self.layer == "hidden":
            if self.layer_idx is None or not -(self.layers + 1) <= self.layer_idx <= self.layers:
                raise ValueError(f"layer='hidden' needs layer_idx in [-{self.layers + 1}, {self.layers}]")
            idx = self.layer_idx % (self.layers + 1)  # index into hidden_states (L + 1 entries)
        need_all = self.layer != "hidden" or self.always_return_pooled
        transformer = CLIPTextTransformer(
            self.vocab_size, self.width, self.layers, self.heads, self.max_length, self.intermediate_size,
            self.act, dtype=self.dtype, name="transformer",
        )
        out = transformer(tokens, num_run=self.layers if need_all else idx)
        if self.layer == "last":
            z = out["last_hidden_state"]
        elif self.layer == "pooled":
            z = out["pooler_output"][:, None, :]
        else:
            z = out["hidden_states"][idx]
        return (z, out["pooler_output"]) if self.always_return_pooled else z


# OpenCLIP's (and OpenAI CLIP's) transformer blocks: the text tower (causal) and, through
# sgm_jax.nn.clip_vision, the image tower (bidirectional).


class OpenCLIPAttention(nn.Module):
    """torch.nn.MultiheadAttention: fused `in_proj` Dense(3W) (q, k, v stacked on the output
    axis, as the checkpoint's in_proj_weight rows) and `out_proj`."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = jnp.split(nn.Dense(3 * self.width, dtype=self.dtype, name="in_proj")(x), 3, axis=-1)
        out = _causal_attention(q, k, v, self.heads, self.causal)
        return nn.Dense(self.width, dtype=self.dtype, name="out_proj")(out)


class OpenCLIPMLP(nn.Module):
    """c_fc -> act (open_clip: exact GELU; OpenAI's weights: QuickGELU) -> c_proj."""

    width: int
    hidden: int
    dtype: Dtype = jnp.float32
    act: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _ACTIVATIONS[self.act](nn.Dense(self.hidden, dtype=self.dtype, name="c_fc")(x))
        return nn.Dense(self.width, dtype=self.dtype, name="c_proj")(h)


class OpenCLIPResidualBlock(nn.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    act: str = "gelu"
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + OpenCLIPAttention(self.width, self.heads, self.dtype, self.causal, name="attn")(
            _layer_norm("ln_1")(x).astype(self.dtype))
        mlp = OpenCLIPMLP(self.width, int(self.width * self.mlp_ratio), self.dtype, self.act, name="mlp")
        return x + mlp(_layer_norm("ln_2")(x).astype(self.dtype))


class OpenCLIPTransformer(nn.Module):
    """`resblocks_0 .. resblocks_{L-1}`; returns the outputs of the first `num_run` blocks,
    preceded by the input (length num_run + 1)."""

    width: int
    heads: int
    layers: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    act: str = "gelu"
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, num_run: int) -> list[jax.Array]:
        hidden = [x]
        for i in range(self.layers):
            if i < num_run or self.is_initializing():  # all blocks exist in the params tree
                x = OpenCLIPResidualBlock(self.width, self.heads, self.mlp_ratio, self.dtype, self.act, self.causal,
                                          name=f"resblocks_{i}")(x)
                hidden.append(x)
        return hidden[: num_run + 1]


class OpenCLIPTextTower(nn.Module):
    """OpenCLIP's text half of `CLIP`: params `token_embedding`, `positional_embedding`
    `[max_length, W]`, `transformer`, `ln_final`, `text_projection` `[W, embed_dim]` (x @ W).

    `__call__(tokens [B, T], num_run=None)` -> list of hidden states (input, then block
    outputs; no ln_final), length num_run + 1.
    """

    vocab_size: int = 49408
    width: int = 1280
    heads: int = 20
    layers: int = 32
    embed_dim: int = 1280
    max_length: int = 77
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.token_embedding = nn.Embed(self.vocab_size, self.width)
        init = nn.initializers.normal(0.01)
        self.positional_embedding = self.param("positional_embedding", init, (self.max_length, self.width))
        self.transformer = OpenCLIPTransformer(self.width, self.heads, self.layers, self.mlp_ratio, self.dtype)
        self.ln_final = _layer_norm()
        self.text_projection = self.param("text_projection", init, (self.width, self.embed_dim))

    def __call__(self, tokens: jax.Array, num_run: int | None = None) -> list[jax.Array]:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        hidden = self.transformer(x.astype(self.dtype), self.layers if num_run is None else num_run)
        if self.is_initializing():  # create ln_final / text_projection params
            self.pool(hidden[-1], tokens)
        return hidden

    def final_ln(self, x: jax.Array) -> jax.Array:
        return self.ln_final(x.astype(jnp.float32)).astype(self.dtype)

    def pool(self, last: jax.Array, tokens: jax.Array) -> jax.Array:
        """ln_final(last)[b, argmax(tokens[b])] @ text_projection: `[B, embed_dim]`."""
        x = _at_eot(self.ln_final(last.astype(jnp.float32)), tokens)
        return (x @ self.text_projection).astype(self.dtype)


# Text-tower sizes of the OpenCLIP architectures the seed uses (open_clip model configs).
OPENCLIP_ARCHS: dict[str, dict[str, int]] = {
    "ViT-H-14": dict(width=1024, heads=16, layers=24, embed_dim=1024),
    "ViT-bigG-14": dict(width=1280, heads=20, layers=32, embed_dim=1280),
}


class _OpenCLIPEmbedderBase(nn.Module):
    """Shared fields: `arch` picks width / heads / layers / embed_dim unless given."""

    pad_token: ClassVar[str | int] = 0  # open_clip.tokenize pads with 0
    LAYERS: ClassVar[tuple[str, ...]] = ("last", "penultimate")

    arch: str = "ViT-bigG-14"
    version: str | None = None  # the seed's pretrained tag; informational (weights come from a checkpoint)
    layer: str = "last"
    vocab_size: int = 49408
    width: int | None = None
    heads: int | None = None
    layers: int | None = None
    embed_dim: int | None = None
    max_length: int = 77
    freeze: bool = True  # informational: freezing is the trainer's business
    dtype: Dtype = jnp.float32

    def dims(self) -> dict[str, int]:
        """{"width", "heads", "layers", "embed_dim"}: explicit fields, else the arch's."""
        given = dict(width=self.width, heads=self.heads, layers=self.layers, embed_dim=self.embed_dim)
        if any(v is None for v in given.values()) and self.arch not in OPENCLIP_ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}: give width, heads, layers, embed_dim explicitly")
        base = OPENCLIP_ARCHS.get(self.arch, {})
        return {k: int(base[k] if v is None else v) for k, v in given.items()}

    def _tower(self) -> tuple[OpenCLIPTextTower, int, int]:
        """(tower named `model`, number of blocks, blocks skipped at the end for `layer`)."""
        if self.layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {self.layer!r}")
        d = self.dims()
        tower = OpenCLIPTextTower(self.vocab_size, d["width"], d["heads"], d["layers"], d["embed_dim"],
                                  self.max_length, dtype=self.dtype, name="model")
        return tower, d["layers"], {"last": 0, "penultimate": 1}[self.layer]


class FrozenOpenCLIPEmbedder2(_OpenCLIPEmbedderBase):
    """The seed's FrozenOpenCLIPEmbedder2 (SDXL's second text encoder; tower under `model`).

    z is the output of the last block (layer "last") or its input ("penultimate").
    Seed semantics: always_return_pooled (needs legacy=False) -> (z, pooled `[B, embed_dim]`),
    z without ln_final; legacy=True -> ln_final(z); legacy=False, no pooled -> z.
    SDXL: arch "ViT-bigG-14", layer "penultimate", always_return_pooled=True, legacy=False.
    """

    always_return_pooled: bool = False
    legacy: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        if self.always_return_pooled and self.legacy:
            raise ValueError("always_return_pooled=True requires legacy=False (as in the seed)")
        tower, layers, skip = self._tower()
        # The last block only runs when its output is needed (layer "last" or pooled).
        need_last = skip == 0 or self.always_return_pooled
        hidden = tower(tokens, layers if need_last else layers - 1)
        z = hidden[layers - skip]
        if self.always_return_pooled:
            return z, tower.pool(hidden[layers], tokens)
        return tower.final_ln(z) if self.legacy else z


class FrozenOpenCLIPEmbedder(_OpenCLIPEmbedderBase):
    """The seed's FrozenOpenCLIPEmbedder (SD 2.x; tower under `model`): ln_final of the
    output of the last block ("last") or of the one before ("penultimate"). `[B, T, W]`.
    SD 2.1: arch "ViT-H-14", layer "penultimate".
    """

    arch: str = "ViT-H-14"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        tower, layers, skip = self._tower()
        hidden = tower(tokens, layers - skip)
        return tower.final_ln(hidden[layers - skip])

"""GeneralConditioner and the seed's embedders (sgm/modules/encoders/modules.py), in Flax.

A conditioner turns a batch dict into the UNet's conditioning dict:
  "vector"    [B, D]       (adm input `y`),
  "crossattn" [B, T, D]    (`context`),
  "concat"    [B, H, W, C] (channels appended to the UNet input; NHWC),
grouping every embedder output by its rank (2, 3, 4) and concatenating along the last axis
in embedder order, exactly as the seed's GeneralConditioner.forward does.

Built from the seed's yaml `emb_models` list, one spec per embedder:
  {"target": "sgm.modules.encoders.modules.ClassEmbedder" (or "ClassEmbedder"),
   "is_trainable": True, "ucg_rate": 0.2, "input_key": "cls",
   "legacy_ucg_value": None, "params": {"embed_dim": 128, "n_classes": 10}}
Embedder i lives at params["embedders_{i}"] (the checkpoint's `conditioner.embedders.{i}.`).

Text: the jitted conditioner never sees strings. Call `tokenize_batch` on the host first; it
replaces each text field (e.g. "txt") with one int32 [B, L] token array per text embedder
under `token_key(input_key, i)` (CLIP and OpenCLIP tokenise/pad differently), plus the
tokens of `legacy_ucg_value` when an embedder on that field uses legacy ucg.

Classifier-free-guidance dropout (ucg) follows the seed per embedder:
  * ucg_rate > 0, no legacy_ucg_value: every output of the embedder is multiplied by its own
    per-example Bernoulli(1 - ucg_rate) mask (ClassEmbedder included: the seed's
    ClassEmbedder has no built-in ucg, its embedding is simply zeroed).
  * legacy_ucg_value set: the *input* is replaced by that value with probability ucg_rate
    (text: by the value's tokens) and no mask is applied. As in the seed, the replacement
    is visible to later embedders reading the same input key.
Dropout happens only when a `ucg_key` is given (training); inference passes none.

Pre-encoded batches (sgm_jax.training.preencode) carry a frozen embedder's outputs under
`embedding_key(i, j)`; the conditioner then uses them instead of running embedder i and applies
the same ucg masks (same keys) to them, so the result equals that of the raw batch.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from sgm_jax.batch_keys import embedding_key
from sgm_jax.nn.layers import timestep_embedding
from sgm_jax.nn.resize import torch_resize_matrix

Batch = Mapping[str, Any]
Tokenizer = Callable[[Sequence[str]], Any]

# ----------------------------------------------------------------------------- registry

EMBEDDER_REGISTRY: dict[str, type[nn.Module]] = {}
# name -> module path, imported on first use so this file loads before/without text.py.
_LAZY_EMBEDDERS: dict[str, str] = {
    name: "sgm_jax.nn.text"
    for name in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2", "FrozenOpenCLIPEmbedder")
}
TEXT_EMBEDDERS = frozenset(_LAZY_EMBEDDERS)
_LAZY_EMBEDDERS.update({  # SVD's image conditioning (it imports the image tower and the VAE)
    name: "sgm_jax.nn.video_embedders"
    for name in ("FrozenOpenCLIPImageEmbedder", "FrozenOpenCLIPImagePredictionEmbedder",
                 "VideoPredictionEmbedderWithEncoder")})
# Constructor arguments of the seed that only make sense in PyTorch; dropped when the Flax
# class does not declare them.
_TORCH_ONLY_KWARGS = frozenset({"device", "freeze", "init_device"})
CLASS_EMBEDDER_CLASSES = 1000  # the seed's ClassEmbedder default n_classes
_SPECIAL_OUT_KEYS = ("cond_view", "cond_motion")  # seed: output keyed by its input key
OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat"}


def register_embedder(cls: type[nn.Module] | None = None, *, name: str | None = None):
    """Class decorator (or call) adding an embedder to EMBEDDER_REGISTRY under `name`."""

    def add(c: type[nn.Module]) -> type[nn.Module]:
        EMBEDDER_REGISTRY[name or c.__name__] = c
        return c

    return add(cls) if cls is not None else add


def get_embedder_class(target: str) -> type[nn.Module]:
    """Resolve a seed dotted path ("sgm.modules.encoders.modules.X"), a bare name, or any
    importable "pkg.mod.Class" path to a Flax embedder class."""
    name = target.rsplit(".", 1)[-1]
    if name in EMBEDDER_REGISTRY:
        return EMBEDDER_REGISTRY[name]
    if name in _LAZY_EMBEDDERS:
        try:
            cls = getattr(importlib.import_module(_LAZY_EMBEDDERS[name]), name)
        except (ImportError, AttributeError) as e:
            raise NotImplementedError(
                f"embedder {name} is not available in sgm_jax ({_LAZY_EMBEDDERS[name]}: {e})"
            ) from e
        return register_embedder(cls, name=name)
    if "." in target and not target.startswith("sgm."):
        module, _, attr = target.rpartition(".")
        return register_embedder(getattr(importlib.import_module(module), attr), name=name)
    raise KeyError(f"unknown embedder {target!r}; known: {sorted(EMBEDDER_REGISTRY)}")


def _freeze(v: Any) -> Any:
    """Make config values hashable (Flax module attributes): lists -> tuples, dicts -> FrozenDict."""
    if hasattr(v, "to_dict"):  # ml_collections.ConfigDict
        v = v.to_dict()
    if isinstance(v, Mapping):
        return FrozenDict({k: _freeze(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
    """One entry of the seed's `emb_models` list, normalised and hashable."""

    target: str
    params: FrozenDict = FrozenDict()
    is_trainable: bool = False
    ucg_rate: float = 0.0
    input_key: str | None = None
    input_keys: tuple[str, ...] | None = None
    legacy_ucg_value: Any = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "EmbedderSpec":
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        if "input_key" not in cfg and "input_keys" not in cfg:
            raise KeyError(f"need either 'input_key' or 'input_keys' for embedder {cfg.get('target')}")
        keys = cfg.get("input_keys")
        return cls(
            target=str(cfg["target"]).rsplit(".", 1)[-1],
            params=_freeze(cfg.get("params") or {}),
            is_trainable=bool(cfg.get("is_trainable", False)),
            ucg_rate=float(cfg.get("ucg_rate", 0.0)),
            input_key=cfg.get("input_key"),
            input_keys=None if "input_key" in cfg or keys is None else tuple(keys),
            legacy_ucg_value=cfg.get("legacy_ucg_value"),
        )

    @property
    def embedder_cls(self) -> type[nn.Module]:
        return get_embedder_class(self.target)

    @property
    def is_text(self) -> bool:
        """Text embedders take host-tokenised int32 ids instead of strings."""
        return self.target in TEXT_EMBEDDERS or hasattr(self.embedder_cls, "pad_token")

    def build(self) -> nn.Module:
        cls = self.embedder_cls
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in self.params.items() if k in fields or k not in _TORCH_ONLY_KWARGS}
        return cls(**kwargs)


def token_key(input_key: str, index: int) -> str:
    """Batch key holding embedder `index`'s int32 [B, L] tokens of text field `input_key`."""
    return f"{input_key}_tokens_{index}"


def ucg_token_key(input_key: str, index: int) -> str:
    """Batch key holding embedder `index`'s tokens of the legacy ucg value, [B, L]."""
    return f"{input_key}_ucg_tokens_{index}"


# ----------------------------------------------------------------------------- conditioner


def _expand_like(mask: jax.Array, x: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


class GeneralConditioner(nn.Module):
    """Flax GeneralConditioner. Build it with `build_conditioner(emb_models)`."""

    specs: tuple[EmbedderSpec, ...] = ()

    def setup(self):
        # A list attribute: Flax names the children embedders_0, embedders_1, ...
        self.embedders = [spec.build() for spec in self.specs]

    def __call__(
        self,
        batch: Batch,
        ucg_key: jax.Array | None = None,
        force_zero_embeddings: Sequence[str] = (),
    ) -> dict[str, jax.Array]:
        """batch: arrays by input key (text already tokenised) -> {"vector", "crossattn", "concat"}.

        ucg_key: PRNG key enabling ucg dropout (training). force_zero_embeddings: input keys
        whose embeddings are replaced by zeros (must be static under jit).
        """
        batch = dict(batch)  # working copy: legacy-ucg replacements are seen by later embedders
        text_dropped: dict[str, jax.Array] = {}  # text key -> [B] bool: replaced by legacy value
        output: dict[str, jax.Array] = {}
        for i, (spec, embedder) in enumerate(zip(self.specs, self.embedders)):
            key = None if ucg_key is None else jax.random.fold_in(ucg_key, i)
            if embedding_key(i, 0) in batch:  # pre-encoded: the stored outputs, then ucg as if computed
                outs = self._stored(i, spec, batch, text_dropped)
            else:
                outs = self._outputs(i, spec, embedder, batch, key, text_dropped)
            for j, emb in enumerate(outs):
                if not spec.is_trainable:
                    emb = jax.lax.stop_gradient(emb)  # seed: torch.no_grad()
                if spec.input_key in _SPECIAL_OUT_KEYS:
                    out_key = spec.input_key
                elif emb.ndim in OUTPUT_DIM2KEYS:
                    out_key = OUTPUT_DIM2KEYS[emb.ndim]
                else:
                    raise ValueError(f"embedder {i} ({spec.target}) output rank {emb.ndim} is not 2, 3 or 4")
                if spec.ucg_rate > 0.0 and spec.legacy_ucg_value is None and key is not None:
                    # An independent mask per output, as the seed draws one inside its loop.
                    keep = jax.random.bernoulli(jax.random.fold_in(key, j + 1), 1.0 - spec.ucg_rate, (emb.shape[0],))
                    emb = _expand_like(keep, emb).astype(emb.dtype) * emb
                if spec.input_key is not None and spec.input_key in force_zero_embeddings:
                    emb = jnp.zeros_like(emb)
                # Every seed concat axis (vector 1, crossattn 2, concat 1 in NCHW) is our last axis.
                output[out_key] = jnp.concatenate([output[out_key], emb], -1) if out_key in output else emb
        return output

    def embedder_outputs(self, batch: Batch, indices: Sequence[int]) -> dict[str, jax.Array]:
        """What pre-encoding stores: {embedding_key(i, j): output j of embedder i, [B, ...]} for
        each i in `indices`, as the embedder computes it (no ucg dropout, not concatenated)."""
        out = {}
        for i in indices:
            outputs = self._outputs(i, self.specs[i], self.embedders[i], dict(batch), None, {})
            out.update({embedding_key(i, j): emb for j, emb in enumerate(outputs)})
        return out

    def _outputs(self, i: int, spec: EmbedderSpec, embedder: nn.Module, batch: dict, key: jax.Array | None,
                 text_dropped: dict) -> tuple[jax.Array, ...]:
        """Embedder i run on its input(s): its outputs as a tuple (one or more)."""
        if spec.input_key is not None:
            emb_out = embedder(self._input(i, spec, batch, key, text_dropped))
        else:
            emb_out = embedder(*[batch[k] for k in spec.input_keys])
        return tuple(emb_out) if isinstance(emb_out, (tuple, list)) else (emb_out,)

    @staticmethod
    def _stored(i: int, spec: EmbedderSpec, batch: Batch, text_dropped: dict) -> tuple[jax.Array, ...]:
        """Embedder i's pre-encoded outputs. Legacy ucg replaces the embedder's *input*, which a
        stored output cannot undergo: such embedders (and those reading a replaced input) are refused."""
        if spec.is_trainable:
            raise ValueError(f"embedder {i} ({spec.target}) is trainable: its outputs cannot come pre-encoded")
        if (spec.legacy_ucg_value is not None and spec.ucg_rate > 0) or spec.input_key in text_dropped:
            raise ValueError(f"embedder {i} ({spec.target}): legacy_ucg_value replaces its input '{spec.input_key}', "
                             "which stored outputs cannot undergo: train it from raw data, not pre-encoded outputs")
        outs, j = [], 0
        while embedding_key(i, j) in batch:
            outs.append(jnp.asarray(batch[embedding_key(i, j)]))
            j += 1
        return tuple(outs)

    @staticmethod
    def _input(i: int, spec: EmbedderSpec, batch: dict, key: jax.Array | None, text_dropped: dict) -> jax.Array:
        """Embedder i's input, with the seed's legacy ucg replacement applied (training only)."""
        k = spec.input_key
        legacy = spec.legacy_ucg_value is not None and spec.ucg_rate > 0.0 and key is not None
        if not spec.is_text:
            x = batch[k]
            if legacy:
                x = jnp.asarray(x)
                drop = jax.random.bernoulli(jax.random.fold_in(key, 0), spec.ucg_rate, (x.shape[0],))
                x = batch[k] = jnp.where(_expand_like(drop, x), jnp.asarray(spec.legacy_ucg_value, x.dtype), x)
            return x
        x = batch.get(token_key(k, i), batch.get(k))
        if x is None or isinstance(x, (str, list, tuple)) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"text embedder {i} needs int token ids under '{token_key(k, i)}' or '{k}': "
                            "run tokenize_batch on the host first")
        if legacy:
            drop = jax.random.bernoulli(jax.random.fold_in(key, 0), spec.ucg_rate, (x.shape[0],))
            text_dropped[k] = drop | text_dropped.get(k, False)
        if k in text_dropped:  # this or an earlier embedder on k replaced these captions
            x = jnp.where(text_dropped[k][:, None], batch[ucg_token_key(k, i)], x)
        return x


def class_count(embedders: Sequence[EmbedderSpec | Mapping[str, Any]]) -> int | None:
    """n_classes of the class embedder (input_key "cls") among the seed's emb_models entries or
    a conditioner's EmbedderSpecs: the labels a model takes (the seed's ClassEmbedder default,
    1000, when the config leaves it out); None: no class input."""
    for e in embedders or ():
        spec = e if isinstance(e, EmbedderSpec) else EmbedderSpec.from_config(e)
        if spec.input_key == "cls":
            return int(spec.params.get("n_classes", CLASS_EMBEDDER_CLASSES))
    return None


def build_conditioner(emb_models: Sequence[Mapping[str, Any]] | None) -> GeneralConditioner:
    """GeneralConditioner from the seed's `conditioner_config.params.emb_models` list."""
    return GeneralConditioner(specs=tuple(EmbedderSpec.from_config(c) for c in (emb_models or ())))


def _as_variables(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept either {"params": tree} variables or the bare params tree."""
    return params if set(params) == {"params"} else {"params": params}


def get_unconditional_conditioning(
    conditioner: GeneralConditioner,
    params: Mapping[str, Any],
    batch_c: Batch,
    batch_uc: Batch | None = None,
    force_uc_zero_embeddings: Sequence[str] | None = None,
    force_cond_zero_embeddings: Sequence[str] | None = None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(c, uc) as the seed: no ucg dropout (no key), uc from batch_uc or batch_c. Jittable."""
    variables = _as_variables(params)
    c = conditioner.apply(variables, batch_c, None, tuple(force_cond_zero_embeddings or ()))
    uc = conditioner.apply(
        variables, batch_c if batch_uc is None else batch_uc, None, tuple(force_uc_zero_embeddings or ())
    )
    return c, uc


def trainable_mask(conditioner: GeneralConditioner, params: Any) -> Any:
    """Pytree of bools shaped like `params` (bare or {"params": ...}): True where the owning
    embedder has is_trainable. For optax.masked / EMA so frozen embedders stay fixed."""

    def leaf(path, _):
        for entry in path:
            m = re.fullmatch(r"embedders_(\d+)", str(getattr(entry, "key", "")))
            if m:
                return conditioner.specs[int(m.group(1))].is_trainable
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} is not under an embedders_<i> subtree")

    return jax.tree_util.tree_map_with_path(leaf, params)


def text_tokenizers(conditioner: GeneralConditioner, clip_tokenizer: Any = None) -> dict[int, Tokenizer]:
    """Per text embedder index, a host callable `list[str] -> int32 [B, max_length]` using
    the shared CLIP BPE tokenizer (`sgm_jax.nn.tokenizer.load_tokenizer()` when None) and the
    embedder class's `pad_token` (eot for CLIP-L, 0 for OpenCLIP). Build once, reuse."""
    from sgm_jax.nn import tokenizer as tk  # host-only dependency (transformers)

    out: dict[int, Tokenizer] = {}
    for i, spec in enumerate(conditioner.specs):
        if spec.input_key and spec.is_text:
            clip_tokenizer = clip_tokenizer if clip_tokenizer is not None else tk.load_tokenizer()
            max_len = int(spec.params.get("max_length", 77))
            pad = getattr(spec.embedder_cls, "pad_token", "eot")
            out[i] = lambda texts, t=clip_tokenizer, m=max_len, p=pad: tk.tokenize(t, texts, m, p)
    return out


def tokenize_batch(
    conditioner: GeneralConditioner,
    batch: Batch,
    tokenizers: Mapping[int | str, Tokenizer] | Sequence[Tokenizer | None] | None = None,
) -> dict[str, Any]:
    """Host-side: replace text fields by int32 token arrays for the jitted conditioner.

    tokenizers: per text embedder, a callable `list[str] -> [B, L] ids` (array-like, or a
    mapping with "input_ids"), looked up by embedder index, then by class name; None builds
    `text_tokenizers(conditioner)` (pass it in yourself to avoid rebuilding every step).
    For each text embedder i on field k, adds `token_key(k, i)` and, when any embedder on k
    uses legacy ucg, `ucg_token_key(k, i)` (the value's tokens repeated B times). The
    consumed string fields are removed; everything else is passed through unchanged.
    """
    specs = conditioner.specs
    if tokenizers is None:
        tokenizers = text_tokenizers(conditioner)
    legacy = {s.input_key: s.legacy_ucg_value for s in specs if s.is_text and s.legacy_ucg_value is not None}
    out = dict(batch)
    for i, spec in enumerate(specs):
        if not spec.input_key or not spec.is_text:
            continue
        k = spec.input_key
        if isinstance(tokenizers, Mapping):
            tok = tokenizers.get(i, tokenizers.get(spec.target))
        else:
            tok = tokenizers[i] if i < len(tokenizers) else None
        if tok is None:
            raise KeyError(f"no tokenizer for text embedder {i} ({spec.target}, input '{k}')")
        texts = batch[k]
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        out[token_key(k, i)] = _as_ids(tok(texts))
        if k in legacy:
            out[ucg_token_key(k, i)] = np.repeat(_as_ids(tok([str(legacy[k])])), len(texts), axis=0)
    for spec in specs:
        if spec.input_key and spec.is_text:
            out.pop(spec.input_key, None)
    return out


def _as_ids(t: Any) -> np.ndarray:
    if isinstance(t, Mapping) or hasattr(t, "input_ids"):
        t = t["input_ids"]
    return np.asarray(t, dtype=np.int32)


# ----------------------------------------------------------------------------- embedders


@register_embedder
class IdentityEncoder(nn.Module):
    """x -> x (any shape; its rank picks the output key)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.asarray(x)


@register_embedder
class ClassEmbedder(nn.Module):
    """Labels [B] int -> [B, embed_dim] (or [B, 1, embed_dim] with add_sequence_dim).
    Param `embedding/embedding` [n_classes, embed_dim] = torch `embedding.weight`."""

    embed_dim: int
    n_classes: int = CLASS_EMBEDDER_CLASSES
    add_sequence_dim: bool = False

    @nn.compact
    def __call__(self, c: jax.Array) -> jax.Array:
        table = nn.Embed(self.n_classes, self.embed_dim, embedding_init=nn.initializers.normal(1.0),
                         name="embedding")  # torch nn.Embedding initialises N(0, 1)
        c = table(jnp.asarray(c).astype(jnp.int32))
        return c[:, None, :] if self.add_sequence_dim else c


@register_embedder
class ClassEmbedderForMultiCond(ClassEmbedder):
    """ClassEmbedder whose input may be wrapped in a one-element list (the seed's version of
    this class calls its parent with the wrong arguments; this keeps its evident intent)."""

    def __call__(self, c: Any) -> jax.Array:
        return super().__call__(c[0] if isinstance(c, (list, tuple)) else c)


@register_embedder
class ConcatTimestepEmbedderND(nn.Module):
    """Embeds each column independently (sinusoidal, outdim) and concatenates:
    x [B] or [B, D] -> [B, D * outdim]. SDXL's size/crop/aesthetic conditioning."""

    outdim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"ConcatTimestepEmbedderND expects [B] or [B, D], got {x.shape}")
        b, d = x.shape
        return timestep_embedding(x.reshape(b * d), self.outdim).reshape(b, d * self.outdim)


@register_embedder
class SpatialRescaler(nn.Module):
    """Resizes [B, H, W, C] by `multiplier`, n_stages times, then optionally maps channels
    with a conv (param `channel_mapper`). With wrap_video, [B, T, H, W, C] is resized per frame."""

    n_stages: int = 1
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 3
    out_channels: int | None = None
    bias: bool = False
    wrap_video: bool = False
    kernel_size: int = 1
    remap_output: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        video_shape = x.shape[:2] if self.wrap_video and x.ndim == 5 else None
        if video_shape is not None:
            x = x.reshape((-1,) + x.shape[2:])
        for _ in range(self.n_stages):
            wh = torch_resize_matrix(x.shape[1], self.multiplier, self.method)
            ww = torch_resize_matrix(x.shape[2], self.multiplier, self.method)
            hi = jax.lax.Precision.HIGHEST  # keep interpolation exact on TPU/GPU matmul units
            x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=hi)
            x = jnp.einsum("pw,bowc->bopc", ww, x, precision=hi)
        if self.out_channels is not None or self.remap_output:
            if self.out_channels is None:
                raise ValueError("SpatialRescaler(remap_output=True) needs out_channels")
            pad = self.kernel_size // 2
            x = nn.Conv(self.out_channels, (self.kernel_size,) * 2, padding=[(pad, pad)] * 2,
                        use_bias=self.bias, name="channel_mapper")(x)
        if video_shape is not None:
            x = x.reshape(video_shape + x.shape[1:])
        return x

"""Transformer pieces of the UNet: the seed's `sgm/modules/attention.py` in Flax linen.

Module and parameter names mirror the seed's (`attn1.to_q`, `ff.net.0.proj`, ...; a Flax
name `to_out_0` stands for the seed's `to_out.0`) so the checkpoint key map is mechanical
(see `sgm_jax.convert.unet`). Images are NHWC, token sequences `[B, T, D]`.

Both of the seed's attention types ("softmax" and "softmax-xformers") compute the same
thing, through `attention` below: by default jax's Pallas splash (flash) kernel in programs traced
for TPUs (`mesh_context.traced_on`: training steps, the sampling runner, the compile check) and
`jax.nn.dot_product_attention` elsewhere ("cudnn": its fused GPU kernel); "tpu" the form that moves
half the bytes on XLA:TPU.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax import mesh_context
from sgm_jax.nn.layers import GroupNorm, remat, zeros_init

Dtype = Any
Context = Union[jax.Array, Sequence[jax.Array], None]
ATTENTION_TYPES = ("softmax", "softmax-xformers")


# The float32 logits one attention call may hold at once. A larger call (SVD-XT's 9,216-token
# self-attention over 50 frames would hold 85 GB) runs its queries in sequential chunks: each query
# row still sees every key, so the maths is unchanged; the fused cuDNN kernel never holds them.
SCORE_BUDGET_BYTES = 2**31


def query_chunk(batch_heads: int, queries: int, keys: int, budget: int = SCORE_BUDGET_BYTES) -> int:
    """Queries per chunk: the largest divisor of `queries` whose `[batch*heads, chunk, keys]` float32
    logits fit `budget` (all of them when they fit at once; at least 1)."""
    rows = max(1, budget // (4 * batch_heads * keys))
    if rows >= queries:
        return queries
    return max(c for c in range(1, rows + 1) if queries % c == 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None,
              budget: int = SCORE_BUDGET_BYTES) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over `[B, T, heads, d]` queries and `[B, S, heads, d]` keys / values.

    implementation None: "splash" where the program is traced for TPUs (`mesh_context.traced_on` a TPU mesh)
    and the kernel's blocks tile the lengths, jax.nn.dot_product_attention's otherwise; "xla" / "cudnn":
    jax.nn's; "tpu": `_attention`'s form; "splash": jax's Pallas splash (flash) kernel where its blocks
    tile the lengths (Pallas's interpret mode off TPU), else the "tpu" form. On a mesh of several devices
    the kernel runs once per batch shard (a shard_map: XLA cannot partition a Mosaic kernel itself); a
    batch that does not divide over the devices takes the non-kernel form. Past `budget` bytes of float32
    logits per device the non-kernel forms run their queries in chunks (each recomputed in the backward
    pass rather than stored)."""
    split = mesh_context.traced_batch_split(q.shape[0])
    tiles = splash_fits(q.shape[1], k.shape[1]) and split is not None
    if tiles and (implementation == "splash" or (implementation is None and mesh_context.traced_platform() == "tpu")):
        return _per_batch_shard(splash_attention, split, q, k, v)
    shards = jax.sharding.get_abstract_mesh().size if split else 1  # the budget is per device's rows
    return _in_query_chunks(q, k, v, "tpu" if implementation == "splash" else implementation, budget * shards)


def _per_batch_shard(fn: Callable[..., jax.Array], axes: tuple[str, ...], *arrays: jax.Array) -> jax.Array:
    """`fn` over `[B, ...]` arrays, run on each device's rows of B (split over `axes` of the traced mesh)."""
    if not axes:
        return fn(*arrays)
    rows = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(rows,) * len(arrays), out_specs=rows,
                         check_vma=False)(*arrays)


def _in_query_chunks(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None, budget: int
                     ) -> jax.Array:
    b, t, n, _ = q.shape
    chunk = t if implementation == "cudnn" else query_chunk(b * n, t, k.shape[1], budget)
    if chunk == t:
        return _attention(q, k, v, implementation)
    chunks = jnp.moveaxis(q.reshape(b, t // chunk, chunk, *q.shape[2:]), 1, 0)  # [T/chunk, B, chunk, n, d]
    out = jax.lax.map(jax.checkpoint(lambda qc: _attention(qc, k, v, implementation)), chunks)
    return jnp.moveaxis(out, 0, 1).reshape(b, t, n, v.shape[-1])


SPLASH_BLOCK = 512  # the kernel's query / key block (smaller sequences use one block)


def splash_fits(queries: int, keys: int) -> bool:
    """Whether the splash kernel's blocks tile these lengths (multiples of 128, or of SPLASH_BLOCK past it)."""
    return all(n % 128 == 0 and n % min(SPLASH_BLOCK, n) == 0 for n in (queries, keys))


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`attention` through jax's Pallas splash-attention kernel (flash attention: logits in VMEM blocks,
    never in HBM; its own backward kernels): `[B, T, heads, d]` -> `[B, T, heads, d]`. The kernel when
    compiled for TPUs (the compile check's devices too), Pallas's interpret mode elsewhere."""
    # Deferred: Pallas's TPU kernels take 0.7 s to import, and only programs traced for TPUs (or asking
    # for "splash") run them: CPU and GPU starts never pay it.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    b, t, n, d = q.shape
    s = k.shape[1]
    bq, bkv = min(SPLASH_BLOCK, t), min(SPLASH_BLOCK, s)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((t, s)) for _ in range(n)])
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, heads, T, d], the kernel's layout

    def run(interpret: bool) -> Callable[..., jax.Array]:
        kernel = splash.make_splash_mha_single_device(mask=mask, block_sizes=blocks, interpret=interpret)
        return lambda q, k, v: heads_first(jax.vmap(kernel)(heads_first(q * d ** -0.5), heads_first(k),
                                                             heads_first(v)))

    return jax.lax.platform_dependent(q, k, v, tpu=run(False), default=run(True))


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over `[B, T, heads, d]` queries and `[B, S, heads, d]` keys / values.

    The logits, their row maxima and the row sums are float32, as in jax.nn.dot_product_attention's
    XLA path; what differs is where the normalisation happens: the unnormalised probabilities
    exp(s - max) are rounded to the compute dtype (as that path rounds the normalised ones) and the
    division by their float32 row sum is applied to the `[B, T, heads, d]` output of the second
    matmul (accumulated in float32) instead of to the `[B, heads, T, S]` scores. The maths is the same
    up to float rounding; the gain is in what XLA writes to memory. With the division on the scores,
    XLA:TPU fuses it into the second matmul's operand, so the first fusion stores exp(s - max) in
    float32: a [2, 10, 4096, 4096] f32 array (1.34 GB) written and read back per self-attention at
    SDXL's 64x64 level. Here it stores them in bfloat16 (half the bytes: 2.8 -> 1.5 GB per call,
    benchmarks/tpu_peer.py, RESULTS.md "peer column"); on XLA:CPU (float32) nothing changes but S/d
    times fewer divisions. `implementation` other than "tpu" (None, "xla", "cudnn"):
    jax.nn.dot_product_attention's instead, the default until a TPU run confirms the compile-only
    figures.
    """
    if implementation != "tpu":
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=acc) * (q.shape[-1] ** -0.5)
    # the max only shifts the exponent (softmax is invariant to it): no gradient through it
    probs = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))).astype(v.dtype)
    total = probs.astype(acc).sum(axis=-1)  # the sum of the rounded values: rows sum to exactly 1
    out = jnp.einsum("bnts,bsnh->btnh", probs, v, preferred_element_type=acc)
    return (out / jnp.swapaxes(total, 1, 2)[..., None]).astype(v.dtype)


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention: the seed's CrossAttention / MemoryEfficientCrossAttention.

    `x` `[B, T, query_dim]`, `context` `[B, S, context_dim]` (None: self-attention)
    -> `[B, T, query_dim]`. Params: `to_q`, `to_k`, `to_v` (no bias), `to_out_0`.
    """

    query_dim: int
    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0
    implementation: str | None = None  # `attention`'s: None / "xla" / "cudnn" (jax.nn), "tpu", "splash"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        inner = self.heads * self.dim_head
        context = x if context is None else context
        proj = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)
        # [B, T, heads*dim_head] -> [B, T, heads, dim_head], the layout dot_product_attention
        # expects; the seed's "b n (h d)" split is the same head-major grouping.
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        q, k, v = split(proj("to_q")(x)), split(proj("to_k")(context)), split(proj("to_v")(context))
        # softmax(q k^T / sqrt(dim_head)) v
        out = attention(q, k, v, self.implementation)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = nn.Dense(self.query_dim, dtype=self.dtype, name="to_out_0")(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class GEGLU(nn.Module):
    """Gated GELU: one projection `proj` to `2*dim_out`, value first, gate second.

    `x` `[..., D]` -> `[..., dim_out]`.
    """

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(nn.Dense(self.dim_out * 2, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)  # torch F.gelu is the exact (erf) GELU


class _LinearGELU(nn.Module):
    """The seed's non-gated `Sequential(Linear, GELU)`: the Linear is child `0`."""

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(nn.Dense(self.dim_out, dtype=self.dtype, name="0")(x), approximate=False)


class FeedForward(nn.Module):
    """The seed's FeedForward: `net.0` (GEGLU, or Linear+GELU), dropout, `net.2` Linear.

    `x` `[..., dim]` -> `[..., dim_out or dim]`.
    """

    dim: int
    dim_out: int | None = None
    mult: int = 4
    glu: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        inner = int(self.dim * self.mult)
        project_in = GEGLU if self.glu else _LinearGELU
        h = project_in(inner, dtype=self.dtype, name="net_0")(x)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(self.dim_out or self.dim, dtype=self.dtype, name="net_2")(h)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    """torch.nn.LayerNorm: eps 1e-5, two-pass variance, statistics in float32."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, name=name)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attn (`attn1`), cross-attn (`attn2`), GEGLU `ff`.

    With `disable_self_attn`, `attn1` attends to the context as well (the seed's semantics).
    `x` `[B, T, dim]`, `context` `[B, S, C]` or None -> `[B, T, dim]`.
    """

    dim: int
    n_heads: int
    d_head: int
    dropout: float = 0.0
    gated_ff: bool = True
    disable_self_attn: bool = False
    deterministic: bool = True
    attn_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        det = self.deterministic
        norm = lambda name: layer_norm(self.dtype, name)
        ctx1 = context if self.disable_self_attn else None
        x = self._attention("attn1", self.dim)(norm("norm1")(x), ctx1, det) + x
        x = self._attention("attn2", self.dim)(norm("norm2")(x), context, det) + x
        return self._feed_forward("ff", self.dim, self.dim)(norm("norm3")(x), det) + x

    def _attention(self, name: str, query_dim: int) -> CrossAttention:
        return CrossAttention(query_dim, self.n_heads, self.d_head, self.dropout, self.attn_implementation,
                              dtype=self.dtype, name=name)

    def _feed_forward(self, name: str, dim: int, dim_out: int) -> FeedForward:
        return FeedForward(dim, dim_out=dim_out, glu=self.gated_ff, dropout=self.dropout, dtype=self.dtype, name=name)


def _context_dims(context_dim: int | Sequence[int] | None, depth: int) -> list[int | None]:
    """The seed's per-block context_dim list: an int is repeated; a homogeneous list whose
    length differs from `depth` is resized (a heterogeneous one must match `depth`)."""
    if context_dim is None:
        return [None] * depth
    dims = [context_dim] if isinstance(context_dim, int) else [int(d) for d in context_dim]
    if len(dims) != depth:
        if any(d != dims[0] for d in dims):
            raise ValueError(f"context_dim {dims} must be homogeneous or have length depth={depth}")
        dims = [dims[0]] * depth
    return dims


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image: the seed's SpatialTransformer.

    GroupNorm (eps 1e-6) -> `proj_in` (1x1 conv, or Linear with `use_linear`) -> `depth`
    BasicTransformerBlocks (`transformer_blocks_{i}`) -> `proj_out` -> residual.
    `x` `[B, H, W, C]`; `context`: `[B, S, D]`, a list of them (one per block, or one for
    all), or None -> `[B, H, W, C]`. `use_checkpoint` rematerialises each block.
    """

    in_channels: int
    n_heads: int
    d_head: int
    depth: int = 1
    dropout: float = 0.0
    context_dim: int | Sequence[int] | None = None
    disable_self_attn: bool = False
    use_linear: bool = False
    attn_type: str = "softmax"
    use_checkpoint: bool = False
    deterministic: bool = True
    attn_implementation: str | None = None  # `attention`'s: None / "xla" / "cudnn" (jax.nn), "tpu", "splash"
    remat_policy: str | None = None  # with use_checkpoint: nn.layers.REMAT_POLICIES (None: keep nothing)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Context = None) -> jax.Array:
        return self._transform(x, context)

    def _transform(
        self, x: jax.Array, context: Context, after_block: Callable[[int, jax.Array], jax.Array] | None = None
    ) -> jax.Array:
        """The body; `after_block(i, tokens)` (tokens `[B, H*W, inner]`) runs after block `i`:
        SpatialVideoTransformer mixes over time there, from its own compact `__call__`."""
        if self.attn_type not in ATTENTION_TYPES:
            raise ValueError(f"attn_type {self.attn_type!r} not in {ATTENTION_TYPES}")
        contexts = list(context) if isinstance(context, (list, tuple)) else [context]
        context_dims = _context_dims(self.context_dim, self.depth)
        b, h, w, c = x.shape
        inner = self.n_heads * self.d_head
        x_in = x
        x = GroupNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, inner)
        block_cls = remat(BasicTransformerBlock, self.remat_policy) if self.use_checkpoint else BasicTransformerBlock
        for i in range(self.depth):
            ctx = contexts[i] if len(contexts) > 1 else contexts[0]
            _check_context(ctx, context_dims[i], inner)
            x = block_cls(
                inner, self.n_heads, self.d_head, dropout=self.dropout,
                disable_self_attn=self.disable_self_attn, deterministic=self.deterministic,
                attn_implementation=self.attn_implementation, dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(x, ctx)
            if after_block is not None:
                x = after_block(i, x)
        if self.use_linear:
            # zero-init as the seed's zero_module: the block starts as the identity.
            x = nn.Dense(c, dtype=self.dtype, kernel_init=zeros_init(), name="proj_out")(x)
            x = x.reshape(b, h, w, c)
        else:
            x = nn.Conv(c, (1, 1), dtype=self.dtype, kernel_init=zeros_init(), name="proj_out")(
                x.reshape(b, h, w, inner)
            )
        return x + x_in.astype(x.dtype)


def _check_context(context: jax.Array | None, context_dim: int | None, inner: int) -> None:
    """Fail early where the seed would fail on a shape mismatch (Flax would infer shapes)."""
    want = inner if context_dim is None else context_dim
    got = inner if context is None else context.shape[-1]
    if got != want:
        what = "no context" if context is None else f"context of width {got}"
        raise ValueError(f"SpatialTransformer built for context_dim={context_dim} got {what}")

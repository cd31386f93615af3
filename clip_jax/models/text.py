"""The CLIP text transformer: causal, pooled at the end-of-text token; and SigLIP's form of it:
bidirectional, pooled at the last position, a projection with a bias."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.infra.errors import UsageError
from clip_jax.models.layers import (
    LN_EPS,
    DenseGeneral,
    Dtype,
    Transformer,
    constrain,
    layer_norm,
    normal_init,
    partitioned,
)
from clip_jax.parallel.fsdp import fsdp_add, fsdp_dot, fsdp_embed, kernel_layout

POOL_TYPES = ("argmax", "eot", "last")
PROJ_TYPES = ("linear", "none")


class TextTransformer(nn.Module):
    """Token + positional embedding, causal transformer, ln_final, EOT pooling, projection.

    `pool_type="argmax"` pools at the highest token id of each row, which is the end-of-text token
    for the OpenAI BPE (id 49407); `pool_type="eot"` pools at the first `eot_token_id` of each
    row (for sentencepiece vocabularies, where EOS is not the largest id), or at the last position
    when a row has none; `pool_type="last"` pools at the last position of every row, whatever it
    holds (SigLIP's towers: their tokenizers pad every text to the context length).

    SigLIP's text tower (open_clip's SigLIP configs) sets `causal=False` (every token attends to
    every other, padding included, as open_clip and big_vision do), `pool_type="last"`,
    `proj_bias=True` (the projection is a dense layer with a bias, named for open_clip's
    `nn.Linear`), `ln_eps=1e-6` and, for SigLIP 2, `gelu_tanh`. `proj_type="none"` leaves the
    projection out: the embedding is the pooled features, of the tower's width.
    """

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    pool_type: str = "argmax"
    eot_token_id: int | None = None
    causal: bool = True  # False: bidirectional attention (SigLIP)
    proj_type: str = "linear"  # one of PROJ_TYPES
    proj_bias: bool = False  # a dense projection with a bias (SigLIP) instead of a matrix
    ln_eps: float = LN_EPS
    gelu_tanh: bool = False  # GELU's tanh approximation instead of exact GELU
    quick_gelu: bool = False
    remat_policy: str = "none"
    attn_impl: str | None = None
    scan_layers: bool = False  # see layers.Transformer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        del train
        b, length = tokens.shape
        if length > self.context_length:
            raise ValueError(f"tokens have length {length}, the context is {self.context_length}")
        dtype = jnp.dtype(self.dtype)
        x = TokenEmbedding(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_embedding",
        )(tokens)  # [B, L, D]
        pos = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(0.01), ("pos", "embed")),
            (self.context_length, self.width),
            self.param_dtype,
        )
        pos = pos[:length]
        x = fsdp_add(x, pos, dtype, kernel_layout(("pos", "embed"), pos.shape))  # [B, L, D]
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        x = Transformer(
            self.layers,
            self.heads,
            mlp_ratio=self.mlp_ratio,
            causal=self.causal,
            quick_gelu=self.quick_gelu,
            gelu_tanh=self.gelu_tanh,
            ln_eps=self.ln_eps,
            remat_policy=self.remat_policy,
            attn_impl=self.attn_impl,
            scan_layers=self.scan_layers,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer",
        )(x)
        x = layer_norm("ln_final", self.dtype, self.param_dtype, self.ln_eps)(x)
        x = x[jnp.arange(b), self.pool_index(tokens)]  # [B, D]
        if self.proj_type not in PROJ_TYPES:
            raise UsageError(f"unknown proj_type {self.proj_type!r}; choose one of {PROJ_TYPES}")
        if self.proj_type == "none":
            if self.output_dim != self.width:
                raise UsageError(
                    f"a text tower without a projection embeds in its width {self.width}, not "
                    f"{self.output_dim} (set embed_dim={self.width})"
                )
            return x
        if self.proj_bias:
            return DenseGeneral(
                (self.output_dim,),
                kernel_axes=("embed", "joint"),
                bias_axes=("joint",),
                init=normal_init(self.width**-0.5),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="text_projection",
            )(x)  # [B, E]
        proj = self.param(
            "text_projection",
            partitioned(nn.initializers.normal(self.width**-0.5), ("embed", "joint")),
            (self.width, self.output_dim),
            self.param_dtype,
        )
        layout = kernel_layout(("embed", "joint"), proj.shape)
        return fsdp_dot(x, proj, 1, dtype, layout)  # [B, E]

    def pool_index(self, tokens: jax.Array) -> jax.Array:  # [B, L] -> [B]
        if self.pool_type == "argmax":
            return jnp.argmax(tokens, axis=-1)
        if self.pool_type == "eot":
            if self.eot_token_id is None:
                raise UsageError("pool_type='eot' needs eot_token_id")
            is_eot = tokens == self.eot_token_id
            return jnp.where(is_eot.any(-1), jnp.argmax(is_eot, -1), tokens.shape[1] - 1)
        if self.pool_type == "last":
            return jnp.full(tokens.shape[:1], tokens.shape[1] - 1)
        raise UsageError(f"unknown pool_type {self.pool_type!r}; choose one of {POOL_TYPES}")


class TokenEmbedding(nn.Module):
    """The token table [vocab, width] (nn.Embed's parameter, same name, init and layout), looked
    up through `fsdp.fsdp_embed`: under FSDP the table is all-gathered in the compute dtype and
    its gradient reduced in float32, as the kernels' are."""

    vocab_size: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, L] -> [B, L, D]
        names = ("vocab", "embed")
        table = self.param(
            "embedding",
            partitioned(nn.initializers.normal(0.02), names),
            (self.vocab_size, self.width),
            self.param_dtype,
        )
        return fsdp_embed(tokens, table, jnp.dtype(self.dtype), kernel_layout(names, table.shape))

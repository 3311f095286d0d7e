"""Two-way transformer of the mask decoder: tokens attend to the image and the image to tokens."""

from __future__ import annotations

import torch
from torch import nn

from samhq_fast.config import SamHQMaskDecoderConfig
from samhq_fast.modeling.common import MLPBlock, layer_norm_fp32
from samhq_fast.ops.fused import FusedOps


class Attention(nn.Module):
    """Attention with an optional down-projection of the embedding (``downsample_rate``)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        return x.reshape(n, t, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_similarity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q`` ``(N, Tq, C)``, ``k``/``v`` ``(N, Tk, C)`` -> ``(N, Tq, C)``; softmax in fp32.

        ``attention_similarity`` (PerSAM target guidance, broadcastable to ``(N, heads, Tq, Tk)``)
        is added to the probabilities, which are then re-normalised with a second softmax.
        """
        q, k, v = (
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(k)),
            self._heads(self.v_proj(v)),
        )
        attn = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        attn = attn.float().softmax(dim=-1)
        if attention_similarity is not None:
            attn = (attn + attention_similarity.float()).softmax(dim=-1)
        out = attn.to(v.dtype) @ v
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def fused(
        self,
        ops: FusedOps,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_group: int = 1,
        kv_group: int = 1,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` through fused ops, optionally ``+ residual`` (fused in the output GEMM).

        ``q`` ``(N / q_group, Tq, C)``, ``k``/``v`` ``(N / kv_group, Tk, C)``: an input shared
        by ``group`` consecutive prompts is projected once (exact: same rows, same weights).
        """
        q = ops.linear(q, self.q_proj.weight, self.q_proj.bias)
        k = ops.linear(k, self.k_proj.weight, self.k_proj.bias)
        v = ops.linear(v, self.v_proj.weight, self.v_proj.bias)
        out = ops.decoder_attention(q, k, v, self.num_heads, q_group, kv_group)
        return ops.linear(out, self.out_proj.weight, self.out_proj.bias, residual=residual)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image cross attention, MLP on tokens, image->token."""

    def __init__(self, config: SamHQMaskDecoderConfig, skip_first_layer_pe: bool) -> None:
        super().__init__()
        c, h, eps = (
            config.hidden_size,
            config.num_attention_heads,
            config.transformer_layer_norm_eps,
        )
        r = config.attention_downsample_rate
        self.self_attn = Attention(c, h)
        self.norm1 = nn.LayerNorm(c, eps=eps)
        self.cross_attn_token_to_image = Attention(c, h, r)
        self.norm2 = nn.LayerNorm(c, eps=eps)
        self.mlp = MLPBlock(c, config.mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(c, eps=eps)
        self.norm4 = nn.LayerNorm(c, eps=eps)
        self.cross_attn_image_to_token = Attention(c, h, r)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        attention_similarity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = layer_norm_fp32(self.norm1, queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + self.cross_attn_token_to_image(q, k, keys, attention_similarity)
        queries = layer_norm_fp32(self.norm2, queries)

        queries = layer_norm_fp32(self.norm3, queries + self.mlp(queries))

        q = queries + query_pe
        keys = keys + self.cross_attn_image_to_token(k, q, queries)
        keys = layer_norm_fp32(self.norm4, keys)
        return queries, keys

    def forward_fused(
        self,
        ops: FusedOps,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        group: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` through fused ops. ``keys`` ``(N / group, L, C)`` may be shared by
        ``group`` consecutive prompts (the first block without a mask prompt); the returned keys
        are per prompt ``(N, L, C)``."""
        dt = queries.dtype
        if self.skip_first_layer_pe:
            queries = self.self_attn.fused(ops, queries, queries, queries)
        else:
            q = queries + query_pe
            queries = self.self_attn.fused(ops, q, q, queries, residual=queries)
        queries = layer_norm_fp32(self.norm1, queries, dt)

        q, k = queries + query_pe, keys + key_pe
        x = self.cross_attn_token_to_image.fused(ops, q, k, keys, kv_group=group, residual=queries)
        queries = layer_norm_fp32(self.norm2, x, dt)
        queries = layer_norm_fp32(self.norm3, queries + self.mlp(queries), dt)

        # image -> token: the image side (queries of this attention) is shared, the output is not.
        res = keys if group == 1 else keys.repeat_interleave(group, dim=0)
        x = self.cross_attn_image_to_token.fused(
            ops, k, queries + query_pe, queries, q_group=group, residual=res
        )
        n4 = self.norm4
        return queries, ops.layer_norm(x, n4.weight, n4.bias, n4.eps, dt)


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final token->image attention."""

    def __init__(self, config: SamHQMaskDecoderConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(config, skip_first_layer_pe=(i == 0))
            for i in range(config.num_hidden_layers)
        )
        self.final_attn_token_to_image = Attention(
            c, config.num_attention_heads, config.attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(c)  # 1e-5 in both peers, whatever the config says

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          image_embedding: ``(N, C, h, w)`` (N = images x prompts, dense prompt already added).
          image_pe: ``(N or 1, C, h, w)``.
          point_embedding: ``(N, T, C)`` output tokens + sparse prompt tokens.
          target_embedding: PerSAM target embedding added to the queries before every block;
            like transformers and PerSAM, it also enters the token positional embedding once.

        Returns:
          tokens ``(N, T, C)`` and image keys ``(N, h * w, C)``.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2).to(keys.dtype)
        if target_embedding is not None:
            point_embedding = point_embedding + target_embedding
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            if target_embedding is not None and i > 0:
                queries = queries + target_embedding
            queries, keys = layer(queries, keys, point_embedding, key_pe, attention_similarity)
        q, k = queries + point_embedding, keys + key_pe
        queries = queries + self.final_attn_token_to_image(q, k, keys)
        return layer_norm_fp32(self.norm_final_attn, queries), keys

    def forward_fused(
        self,
        ops: FusedOps,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        group: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` (without PerSAM guidance) through fused ops.

        ``image_embedding`` ``(N / group, C, h, w)``: with ``group > 1`` each image embedding
        (dense prompt included) is shared by ``group`` consecutive prompts of ``point_embedding``
        ``(N, T, C)``; the first block then projects the image side once per image, which is
        exact. Returns tokens ``(N, T, C)`` and keys ``(N, h * w, C)``.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2).to(keys.dtype)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer.forward_fused(ops, queries, keys, point_embedding, key_pe, group)
            group = 1
        q, k = queries + point_embedding, keys + key_pe
        queries = self.final_attn_token_to_image.fused(ops, q, k, keys, residual=queries)
        return layer_norm_fp32(self.norm_final_attn, queries, queries.dtype), keys

"""Two-way transformer of the mask decoder: tokens attend to the image and the image to tokens."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from samhq_fast.config import SamHQMaskDecoderConfig
from samhq_fast.modeling.common import MLPBlock, layer_norm_fp32
from samhq_fast.ops.fused import FusedOps

_REBUILD_LOCK = threading.Lock()


def _source_key(t: torch.Tensor) -> tuple:
    # data_ptr: .to() / .half() / load_state_dict(assign=True) give new memory; _version: an
    # in-place write (load_state_dict's copy_, perturbing a weight) bumps it. Weights made under
    # inference_mode have no version counter: only their memory is checked.
    version = -1 if t.is_inference() else t._version
    return (t.data_ptr(), version, t.dtype, t.device, tuple(t.shape))


class DerivedWeights:
    """Tensors derived from parameters (concatenated projections, stacked MLP weights) for the
    fused paths, built once and rebuilt only when a source parameter changes.

    ``get(name, sources, build)`` returns ``build(sources)`` computed the last time the sources
    (by memory and version counter) were what they are now. A rebuild at the same shape, dtype
    and device writes into the old tensor, so a CUDA graph captured on it reads the new values
    (:meth:`~samhq_fast.modeling.mask_decoder.MaskDecoderHQ.prepare_fused`, called before every
    replay, does the check). Under ``torch.compile`` the cached tensor is used as is (the check
    reads ``data_ptr``, which dynamo cannot trace; the runner prepares before the compiled call).
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple, torch.Tensor]] = {}

    def get(
        self,
        name: str,
        sources: list[torch.Tensor],
        build: Callable[[list[torch.Tensor]], torch.Tensor],
    ) -> torch.Tensor:
        hit = self._cache.get(name)
        if torch.compiler.is_compiling():
            return hit[1] if hit is not None else build(sources)
        key = tuple(_source_key(t) for t in sources)
        if hit is not None and hit[0] == key:
            return hit[1]
        with _REBUILD_LOCK:  # one builder: a graph and the cache must see the same tensor
            hit = self._cache.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
            return self._build(name, key, hit, sources, build)

    def _build(
        self,
        name: str,
        key: tuple,
        hit: tuple[tuple, torch.Tensor] | None,
        sources: list[torch.Tensor],
        build: Callable[[list[torch.Tensor]], torch.Tensor],
    ) -> torch.Tensor:
        old = hit[1] if hit is not None else None
        with torch.no_grad():
            new = build([t.detach() for t in sources])
            if old is not None and (old.shape, old.dtype, old.device) == (
                new.shape,
                new.dtype,
                new.device,
            ):
                with torch.inference_mode(old.is_inference()):
                    new = old.copy_(new)  # in place: captured graphs read this memory
        self._cache[name] = (key, new)
        return new


def derived_weights(module: nn.Module) -> DerivedWeights:
    """``module``'s :class:`DerivedWeights` (created on first use; not a buffer: it is never
    saved, and ``.to()`` leaves it behind, which the source check notices)."""
    d = module.__dict__.get("_derived_weights")
    if d is None:
        d = module.__dict__["_derived_weights"] = DerivedWeights()
    return d


def merged_linear(
    module: nn.Module, name: str, linears: list[nn.Linear]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(sum N_i, K)`` and bias of ``linears`` (which read the same input) concatenated:
    one GEMM instead of one per linear; its output's column slices are their outputs."""
    d = derived_weights(module)
    w = d.get(f"{name}.weight", [lin.weight for lin in linears], torch.cat)
    b = d.get(f"{name}.bias", [lin.bias for lin in linears], torch.cat)
    return w, b


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

    def fused_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The concatenated projections of :meth:`forward_fused` (see :func:`merged_linear`):
        self-attention q+k (+v without positional encoding: all three read the queries), and
        the two projections of the image side ``keys + key_pe``: token->image keys and
        image->token queries."""
        sa, t2i, i2t = (
            self.self_attn,
            self.cross_attn_token_to_image,
            self.cross_attn_image_to_token,
        )
        if self.skip_first_layer_pe:
            self_in = merged_linear(self, "self_qkv", [sa.q_proj, sa.k_proj, sa.v_proj])
        else:
            self_in = merged_linear(self, "self_qk", [sa.q_proj, sa.k_proj])
        image = merged_linear(self, "image_kq", [t2i.k_proj, i2t.q_proj])
        return {"self": self_in, "image": image}

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
        are per prompt ``(N, L, C)``.

        Projections that read one input run as one GEMM (:meth:`fused_weights`), and attention
        reads its q / k column slices in place; LayerNorms (fp32 statistics), the MLP (ReLU in
        the first GEMM's epilogue, the residual in the second's) and residual adds are fused
        ops."""
        dt = queries.dtype
        sa, t2i, i2t = (
            self.self_attn,
            self.cross_attn_token_to_image,
            self.cross_attn_image_to_token,
        )
        w = self.fused_weights()
        c = sa.internal_dim
        if self.skip_first_layer_pe:
            q, k, v = ops.linear(queries, *w["self"]).split(c, dim=-1)
            out = ops.decoder_attention(q, k, v, sa.num_heads)
            queries = ops.linear(out, sa.out_proj.weight, sa.out_proj.bias)
        else:
            qk = ops.linear(queries + query_pe, *w["self"])
            v = ops.linear(queries, sa.v_proj.weight, sa.v_proj.bias)
            out = ops.decoder_attention(qk[..., :c], qk[..., c:], v, sa.num_heads)
            queries = ops.linear(out, sa.out_proj.weight, sa.out_proj.bias, residual=queries)
        n1 = self.norm1
        queries = ops.layer_norm(queries, n1.weight, n1.bias, n1.eps, dt)

        # token -> image; the image side keys + key_pe also gives image -> token's queries.
        ci = t2i.internal_dim
        kq = ops.linear(keys + key_pe, *w["image"])  # (N / group, L, ci + i2t.internal_dim)
        q = ops.linear(queries + query_pe, t2i.q_proj.weight, t2i.q_proj.bias)
        v = ops.linear(keys, t2i.v_proj.weight, t2i.v_proj.bias)
        out = ops.decoder_attention(q, kq[..., :ci], v, t2i.num_heads, 1, group)
        x = ops.linear(out, t2i.out_proj.weight, t2i.out_proj.bias, residual=queries)
        n2, n3, mlp = self.norm2, self.norm3, self.mlp
        queries = ops.layer_norm(x, n2.weight, n2.bias, n2.eps, dt)
        h = ops.linear(queries, mlp.lin1.weight, mlp.lin1.bias, "relu")
        x = ops.linear(h, mlp.lin2.weight, mlp.lin2.bias, residual=queries)
        queries = ops.layer_norm(x, n3.weight, n3.bias, n3.eps, dt)

        # image -> token: the image side (queries of this attention) is shared, the output is not.
        k = ops.linear(queries + query_pe, i2t.k_proj.weight, i2t.k_proj.bias)
        v = ops.linear(queries, i2t.v_proj.weight, i2t.v_proj.bias)
        out = ops.decoder_attention(kq[..., ci:], k, v, i2t.num_heads, group, 1)
        res = keys if group == 1 else keys.repeat_interleave(group, dim=0)
        x = ops.linear(out, i2t.out_proj.weight, i2t.out_proj.bias, residual=res)
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
        nf = self.norm_final_attn
        return ops.layer_norm(queries, nf.weight, nf.bias, nf.eps, queries.dtype), keys

    def prepare_fused(self) -> None:
        """Build (or refresh, after a weight change) the derived weights of every block."""
        for layer in self.layers:
            layer.fused_weights()

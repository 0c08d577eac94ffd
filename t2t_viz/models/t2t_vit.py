"""Tokens-to-Token Vision Transformer (T2T-ViT), native in timm.

Paper: `Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet`
    - https://arxiv.org/abs/2101.11986 (Yuan et al., ICCV 2021)

The Tokens-to-Token module turns an image into tokens by three overlapping soft splits (``nn.Unfold``,
kernels 7/3/3, strides 4/2/2, paddings 2/1/1) with a small Performer or Transformer layer
("restructurization") between them; a linear projection then feeds a deep-narrow ViT backbone with a
class token and a fixed sinusoidal position table.

Parameter names match the authors' release files, so those load with ``strict=True``. Facts of the
released weights that this implementation keeps:
    * backbone attention is scaled by ``head_dim ** -0.5`` (how the checkpoints were trained and evaluated);
    * a T2T Transformer layer maps the input token width (147, then 576) to 64, is scaled by
      ``input_width ** -0.5`` and its attention residual adds ``v``;
    * a T2T Performer layer's random feature matrix ``w`` is stored in the checkpoint (never re-drawn)
      and its attention residual adds ``v`` too.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._hub import download_cached_file
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block as VitBlock

from .checkpoint_io import CheckpointError, read_checkpoint

__all__ = ['T2TViT', 'T2TStage', 'TokensToToken', 'checkpoint_filter_fn', 'sinusoid_position_table']

_logger = logging.getLogger(__name__)


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 1D sinusoid table of the paper, shape (1, num_positions, dim); computed in float64."""
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)  # (N, 1)
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim  # (dim,)
    angles = position / torch.pow(10000.0, exponent)  # (N, dim)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)


class SoftSplit(nn.Module):
    """Overlapping unfold of an image or token map into tokens: (B, C, H, W) -> (B, h*w, C*k*k)."""

    def __init__(self, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.unfold = nn.Unfold(kernel_size=kernel_size, stride=stride, padding=padding)

    def output_grid(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid that the unfold arithmetic produces for an input of this size."""
        k, s, p = self.kernel_size, self.stride, self.padding
        return (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: the LayerNorm that follows would otherwise make the same copy where no one sees it
        return self.unfold(x).transpose(1, 2).contiguous()


class TokenTransformer(nn.Module):
    """Single-head Transformer layer of the T2T module, narrowing token width ``in_features`` -> ``token_dim``."""

    def __init__(self, in_features: int, token_dim: int, mlp_ratio: float = 1.0, proj_drop: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_features)
        self.attn = TokenTransformerAttention(in_features, token_dim, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, hidden_features=int(token_dim * mlp_ratio), out_features=token_dim, drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))  # (B, N, token_dim)
        return x + self.mlp(self.norm2(x))


class TokenTransformerAttention(nn.Module):
    """Attention whose q/k/v map the input width to ``token_dim``; scaled by ``in_features ** -0.5``."""

    def __init__(self, in_features: int, token_dim: int, proj_drop: float = 0.):
        super().__init__()
        self.token_dim = token_dim
        self.scale = in_features ** -0.5
        self.qkv = nn.Linear(in_features, token_dim * 3, bias=False)
        self.proj = nn.Linear(token_dim, token_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.token_dim, dim=-1)  # each (B, N, token_dim)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, N, token_dim)
        return v + self.proj_drop(self.proj(y))  # widths differ, so the residual is v


class TokenPerformer(nn.Module):
    """Performer layer of the T2T module: linear-cost attention through positive random features."""

    def __init__(self, in_features: int, token_dim: int, kernel_ratio: float = 0.5, proj_drop: float = 0.):
        super().__init__()
        self.token_dim = token_dim
        self.num_features = int(token_dim * kernel_ratio)
        self.epsilon = 1e-8
        self.norm1 = nn.LayerNorm(in_features)
        self.kqv = nn.Linear(in_features, 3 * token_dim)
        self.dp = nn.Dropout(proj_drop)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm2 = nn.LayerNorm(token_dim)
        # Module indices give the release file's names: mlp.0.weight, mlp.2.weight.
        self.mlp = nn.Sequential(
            nn.Linear(token_dim, token_dim), nn.GELU(), nn.Linear(token_dim, token_dim), nn.Dropout(proj_drop))
        # Frozen random feature matrix; part of the checkpoint, so a trained model never re-draws it.
        features = nn.init.orthogonal_(torch.empty(self.num_features, token_dim)) * math.sqrt(self.num_features)
        self.register_buffer('w', features)  # (m, token_dim)

    def _random_features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), so that E[phi(q) . phi(k)] = exp(q . k)."""
        x = x.float()
        half_sq_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (B, N, 1)
        projection = x @ self.w.t()  # (B, N, m)
        return torch.exp(projection - half_sq_norm) / math.sqrt(self.num_features)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.token_dim, dim=-1)  # each (B, N, token_dim); release order k, q, v
        k_features, q_features = self._random_features(k), self._random_features(q)  # (B, N, m)
        normalizer = q_features @ k_features.sum(dim=1).unsqueeze(-1)  # (B, N, 1)
        kv = k_features.transpose(1, 2) @ v.float()  # (B, m, token_dim)
        y = (q_features @ kv) / (normalizer + self.epsilon)  # (B, N, token_dim)
        return v + self.dp(self.proj(y.to(v.dtype)))  # widths differ, so the residual is v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Block(VitBlock):
    """timm's pre-norm ViT block, plus the class token's output alone for the last block of ``forward``."""

    def forward_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, C) -> (B, 1, C): ``forward(x)[:, :1]``, without the patch tokens' query, projection and MLP.

        The class token still attends to every token, so keys and values are computed for all of them.
        """
        attn = self.attn
        B, N, _ = x.shape
        width = attn.num_heads * attn.head_dim
        x_norm = self.norm1(x)
        q_weight, kv_weight = attn.qkv.weight.split([width, 2 * width])
        q_bias, kv_bias = (None, None) if attn.qkv.bias is None else attn.qkv.bias.split([width, 2 * width])
        q = F.linear(x_norm[:, :1], q_weight, q_bias)  # (B, 1, H*D)
        q = q.view(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, 1, D)
        kv = F.linear(x_norm, kv_weight, kv_bias).view(B, N, 2, attn.num_heads, attn.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
        y = F.scaled_dot_product_attention(
            attn.q_norm(q), attn.k_norm(k), v, dropout_p=attn.attn_drop.p if self.training else 0.)  # (B, H, 1, D)
        y = y.transpose(1, 2).reshape(B, 1, width)  # (B, 1, H*D)
        if hasattr(attn, 'norm'):  # newer timm: optional norm before the projection (Identity here)
            y = attn.norm(y)
        y = attn.proj_drop(attn.proj(y))  # (B, 1, C)
        x = x[:, :1] + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _has_hooks(module: nn.Module) -> bool:
    """True when a hook watches ``module`` or any module inside it (or every module, globally)."""
    global_hooks = ('_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
                    '_global_backward_pre_hooks')
    if any(getattr(torch_module, name, None) for name in global_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in module.modules())


@dataclass
class T2TStage:
    """One step of the Tokens-to-Token module, for one batch."""
    name: str
    tokens: torch.Tensor  # (B, N, C)
    grid: Tuple[int, int]  # (h, w) with h * w == N

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def width(self) -> int:
        return self.tokens.shape[2]

    @property
    def feature_map(self) -> torch.Tensor:
        """Tokens laid back on their grid, (B, C, h, w)."""
        return self.tokens.transpose(1, 2).reshape(self.tokens.shape[0], self.width, *self.grid)


T2T_STAGE_NAMES = (
    'input', 'soft_split1', 'restructurization1', 'soft_split2', 'restructurization2', 'soft_split3', 'projection')


class TokensToToken(nn.Module):
    """Soft split -> restructurize -> soft split -> restructurize -> soft split -> project."""

    def __init__(self, t2t_layer: str = 'performer', in_chans: int = 3, embed_dim: int = 768, token_dim: int = 64,
                 proj_drop: float = 0.):
        super().__init__()
        if t2t_layer == 'performer':
            layer = partial(TokenPerformer, kernel_ratio=0.5, proj_drop=proj_drop)
        elif t2t_layer == 'transformer':
            layer = partial(TokenTransformer, mlp_ratio=1.0, proj_drop=proj_drop)
        else:
            raise ValueError(f"t2t_layer must be 'performer' or 'transformer', not {t2t_layer!r}")
        self.soft_split0 = SoftSplit(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = SoftSplit(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = SoftSplit(kernel_size=3, stride=2, padding=1)
        self.attention1 = layer(in_chans * 7 * 7, token_dim)
        self.attention2 = layer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def grid_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """Token grids after each of the three soft splits."""
        grids = []
        for split in (self.soft_split0, self.soft_split1, self.soft_split2):
            height, width = split.output_grid(height, width)
            grids.append((height, width))
        return grids

    def output_grid(self, height: int, width: int) -> Tuple[int, int]:
        return self.grid_sizes(height, width)[-1]

    def forward(self, x: torch.Tensor, stages: Optional[List[T2TStage]] = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, embed_dim); appends every step to ``stages`` when a list is given."""
        B, C, H, W = x.shape
        grid1, grid2, grid3 = self.grid_sizes(H, W)
        record = stages.append if stages is not None else None
        if record:
            record(T2TStage('input', x.flatten(2).transpose(1, 2), (H, W)))

        x = self.soft_split0(x)  # (B, N1, C*49)
        if record:
            record(T2TStage('soft_split1', x, grid1))
        x = self.attention1(x)  # (B, N1, token_dim)
        if record:
            record(T2TStage('restructurization1', x, grid1))

        x = self.soft_split1(x.transpose(1, 2).reshape(B, -1, *grid1))  # (B, N2, token_dim*9)
        if record:
            record(T2TStage('soft_split2', x, grid2))
        x = self.attention2(x)  # (B, N2, token_dim)
        if record:
            record(T2TStage('restructurization2', x, grid2))

        x = self.soft_split2(x.transpose(1, 2).reshape(B, -1, *grid2))  # (B, N3, token_dim*9)
        if record:
            record(T2TStage('soft_split3', x, grid3))
        x = self.project(x)  # (B, N3, embed_dim)
        if record:
            record(T2TStage('projection', x, grid3))
        return x


class T2TViT(nn.Module):
    """T2T-ViT: Tokens-to-Token module + class token + fixed sinusoid positions + pre-norm ViT blocks."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            t2t_layer: str = 'performer',
            token_dim: int = 64,
            token_label_head: bool = False,
            dynamic_img_size: bool = False,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        """
        Args:
            img_size: input size the position table is built for, int or (H, W).
            t2t_layer: restructurization layer of the T2T module, 'performer' or 'transformer'.
            token_label_head: add the dense ``aux_head`` of Token Labeling models; their logits are
                class-token logits + 0.5 * max over patch tokens of the aux logits.
            dynamic_img_size: accept other input sizes by resampling the position table on the fly.
        """
        super().__init__()
        assert global_pool in ('token', 'avg', '')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.img_size = to_2tuple(img_size)

        self.tokens_to_token = TokensToToken(
            t2t_layer=t2t_layer, in_chans=in_chans, embed_dim=embed_dim, token_dim=token_dim)
        self.grid_size = self.tokens_to_token.output_grid(*self.img_size)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed (never trained) but saved in the release files, hence a persistent buffer.
        self.register_buffer('pos_embed', sinusoid_position_table(num_patches + 1, embed_dim))  # (1, 1+N, C)
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=nn.LayerNorm)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = None
        if token_label_head:
            self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'cls_token'}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.aux_head is not None:
            self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load a release file safely (timm calls this for ``custom_load`` configs)."""
        state_dict = checkpoint_filter_fn(read_checkpoint(checkpoint_path), self, source=checkpoint_path)
        self.load_state_dict(state_dict, strict=True)

    def token_grid(self, height: int, width: int) -> Tuple[int, int]:
        """Backbone token grid (h, w) for an input of this size, from the unfold arithmetic."""
        return self.tokens_to_token.output_grid(height, width)

    def _pos_embed(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if tuple(grid) != tuple(self.grid_size):
            if not self.dynamic_img_size:
                raise ValueError(
                    f'input gives a {grid[0]}x{grid[1]} token grid but the model was built for '
                    f'{self.img_size[0]}x{self.img_size[1]} ({self.grid_size[0]}x{self.grid_size[1]} tokens); '
                    'create it with img_size=... or dynamic_img_size=True')
            pos_embed = resample_abs_pos_embed(
                pos_embed, new_size=list(grid), old_size=list(self.grid_size), num_prefix_tokens=1)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat((cls_tokens, x), dim=1)  # (B, 1+N, C)
        return self.pos_drop(x + pos_embed)

    def _embed(self, x: torch.Tensor, stages: Optional[List[T2TStage]] = None) -> torch.Tensor:
        grid = self.token_grid(x.shape[-2], x.shape[-1])
        return self._pos_embed(self.tokens_to_token(x, stages), grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalized tokens (B, 1+N, C), class token first."""
        x = self.blocks(self._embed(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            pooled = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == 'token':
            pooled = x[:, 0]
        else:
            pooled = x
        if pre_logits:
            return pooled
        logits = self.head(pooled)
        if self.aux_head is not None:
            aux_logits = self.aux_head(x[:, self.num_prefix_tokens:])  # (B, N, classes)
            logits = logits + 0.5 * aux_logits.max(dim=1).values
        return logits

    def _class_token_suffices(self) -> bool:
        """Whether the logits need only the last block's class token, and nothing watches the other tokens."""
        return (not self.training and self.global_pool == 'token' and self.aux_head is None
                and len(self.blocks) > 0 and isinstance(self.blocks[-1], Block)
                and getattr(self.blocks[-1].attn, 'gate', None) is None  # gated attention: not handled
                and not _has_hooks(self.blocks) and not _has_hooks(self.norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._class_token_suffices():
            return self.forward_head(self.forward_features(x))
        # Same logits as above: the last block's patch tokens never reach a class-token head, so their
        # query, projection and MLP (about 3% of T2T-ViT-24's MACs) are skipped. Hooks turn this off.
        *body, last = self.blocks
        x = self._embed(x)  # (B, 1+N, C)
        for block in body:
            x = block(x)
        return self.forward_head(self.norm(last.forward_class_token(x)))  # norm of (B, 1, C)

    def forward_t2t_stages(self, x: torch.Tensor) -> List[T2TStage]:
        """Every Tokens-to-Token step in order: input, 3 soft splits, 2 restructurizations, projection."""
        stages: List[T2TStage] = []
        self.tokens_to_token(x, stages)
        return stages

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Backbone block outputs, as in timm's VisionTransformer.

        Args:
            indices: take the last n blocks if int, all if None, these block indices if a sequence.
            return_prefix_tokens: return (spatial, class token) pairs.
            norm: apply the final norm to each intermediate.
            stop_early: stop after the last requested block.
            output_fmt: 'NCHW' (maps on the real token grid) or 'NLC'.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt in ('NCHW', 'NLC'), 'output_fmt must be NCHW or NLC'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        grid_h, grid_w = self.token_grid(height, width)
        x = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]  # (B, 1, C) each
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]  # (B, N, C) each
        if output_fmt == 'NCHW':
            intermediates = [y.reshape(B, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the blocks (and optionally norm/head) after the last index kept."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.aux_head = None
            self.reset_classifier(0, '')
        return take_indices


def _checkpoint_grid(checkpoint: Dict[str, Any], num_patches: int) -> Tuple[int, int]:
    """Token grid a checkpoint's position table was built for (its ``args.img_size`` or a square)."""
    args = checkpoint.get('args')
    img_size = getattr(args, 'img_size', None)
    if img_size:
        grid = TokensToToken().output_grid(*to_2tuple(img_size))
        if grid[0] * grid[1] == num_patches:
            return grid
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(f'pos_embed has {num_patches} patch rows, which is not a square grid')
    return side, side


def _unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _describe_mismatch(state_dict: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], limit: int = 5) -> str:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f'{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = []
    for label, items in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', wrong_shape)):
        if items:
            more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
            parts.append(f"{label} {len(items)}: {', '.join(items[:limit])}{more}")
    return '; '.join(parts)


def checkpoint_filter_fn(
        checkpoint: Dict[str, Any], model: T2TViT, source: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Turn any release-file layout into a state dict for ``model``; pure (nothing is modified).

    Accepts a plain state dict or a training checkpoint (``state_dict_ema`` preferred over ``state_dict``,
    extra entries such as ``epoch``, ``optimizer``, ``args`` ignored), strips ``module.`` prefixes,
    resamples ``pos_embed`` bicubically to the model's token grid, keeps the model's own classifier when
    its class count differs, and raises CheckpointError naming the source and the first mismatched
    keys/shapes when the file is not a checkpoint of this variant.
    """
    if source is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        source = cfg.get('file') or cfg.get('url') or 'state dict'
    state_dict = _unwrap_state_dict(checkpoint)
    expected = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key[len('module.'):] if key.startswith('module.') else key
        if key == 'pos_embed' and 'pos_embed' in expected and value.shape != expected['pos_embed'].shape:
            if value.ndim != 3 or value.shape[-1] != expected['pos_embed'].shape[-1]:
                raise CheckpointError(
                    f'{source}: not a checkpoint of this model: pos_embed {tuple(value.shape)} vs model '
                    f"{tuple(expected['pos_embed'].shape)}")
            old_grid = _checkpoint_grid(checkpoint, value.shape[1] - 1)
            _logger.info('%s: resampling pos_embed from %s to %s', source, old_grid, model.grid_size)
            value = resample_abs_pos_embed(
                value.float(), new_size=list(model.grid_size), old_size=list(old_grid), num_prefix_tokens=1)
        out[key] = value

    for head in ('head', 'aux_head'):
        weight = out.get(f'{head}.weight')
        if weight is not None and f'{head}.weight' in expected and weight.shape[0] != model.num_classes:
            _logger.warning('%s: %s has %d classes, the model %d; keeping the model head',
                            source, head, weight.shape[0], model.num_classes)
            for suffix in ('weight', 'bias'):
                out[f'{head}.{suffix}'] = expected[f'{head}.{suffix}']

    mismatch = _describe_mismatch(out, expected)
    if mismatch:
        raise CheckpointError(f'{source}: not a checkpoint of this model ({mismatch})')
    return out


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': None, 'classifier': 'head',
        'custom_load': True,  # release files hold an argparse Namespace: read by T2TViT.load_pretrained
        'paper_ids': 'arXiv:2101.11986', 'origin_url': 'https://github.com/yitu-opensource/T2T-ViT',
        **kwargs,
    }


_RELEASES = 'https://github.com/yitu-opensource/T2T-ViT/releases/download/main/'

default_cfgs = generate_default_cfgs({
    't2t_vit_7.in1k': _cfg(_RELEASES + '71.7_T2T_ViT_7.pth.tar'),
    't2t_vit_10.in1k': _cfg(_RELEASES + '75.2_T2T_ViT_10.pth.tar'),
    't2t_vit_12.in1k': _cfg(_RELEASES + '76.5_T2T_ViT_12.pth.tar'),
    't2t_vit_14.in1k': _cfg(_RELEASES + '81.5_T2T_ViT_14.pth.tar'),
    't2t_vit_14.in1k_384': _cfg(_RELEASES + '83.3_T2T_ViT_14.pth.tar', input_size=(3, 384, 384)),
    't2t_vit_19.in1k': _cfg(_RELEASES + '81.9_T2T_ViT_19.pth.tar'),
    't2t_vit_24.in1k': _cfg(_RELEASES + '82.3_T2T_ViT_24.pth.tar'),
    't2t_vit_24.tl_in1k': _cfg(_RELEASES + '84.2_T2T_ViT_24.pth.tar'),
    't2t_vit_t_14.in1k': _cfg(_RELEASES + '81.7_T2T_ViTt_14.pth.tar'),
    't2t_vit_t_19.in1k': _cfg(_RELEASES + '82.4_T2T_ViTt_19.pth.tar'),
    't2t_vit_t_24.in1k': _cfg(_RELEASES + '82.6_T2T_ViTt_24.pth.tar'),
})


def _fetch_release_file(variant: str, kwargs: Dict[str, Any]) -> None:
    """Download a release URL into timm's cache with a progress bar (timm's own default is silent).

    timm then finds the cached file and loads it as usual; files, state dicts and hub ids are left to timm.
    """
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    if cfg.url and not (cfg.file or cfg.state_dict or cfg.hf_hub_id or cfg.source):
        download_cached_file(cfg.url, check_hash=False, progress=True, cache_dir=kwargs.get('cache_dir'))


def _create_t2t_vit(variant: str, pretrained: bool = False, **kwargs) -> T2TViT:
    tag = kwargs.get('pretrained_cfg')
    if isinstance(tag, str) and tag.startswith('tl_'):
        kwargs.setdefault('token_label_head', True)  # Token Labeling release files carry an aux_head
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if overlay.get('file') and 'custom_load' not in overlay:
        # timm would read a local file itself; ours refuses unsafe pickles and names the file in errors
        kwargs['pretrained_cfg_overlay'] = {**overlay, 'custom_load': True}
    if pretrained:
        _fetch_release_file(variant, kwargs)
    return build_model_with_cfg(
        T2TViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='performer', embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.)
    return _create_t2t_vit('t2t_vit_7', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_10(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='performer', embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.)
    return _create_t2t_vit('t2t_vit_10', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='performer', embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.)
    return _create_t2t_vit('t2t_vit_12', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='performer', embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_14', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_19(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='performer', embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_19', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_24(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='performer', embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_24', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='transformer', embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_t_14', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='transformer', embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_t_19', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs) -> T2TViT:
    model_args = dict(t2t_layer='transformer', embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_t_24', pretrained=pretrained, **dict(model_args, **kwargs))

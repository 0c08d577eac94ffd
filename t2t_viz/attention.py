"""Exact attention maps of ViT and T2T-ViT, recomputed from the captured inputs of their blocks.

The models run PyTorch's fused attention (``F.scaled_dot_product_attention``), which never builds the
N x N attention matrix, so no hook can see it. Instead, one ordinary forward pass records the *input* of
each requested block with forward pre-hooks (stopping as soon as the last one is recorded), and the
attention is recomputed afterwards from that input with the block's own weights, for the query rows
asked for only::

    A[h, i, :] = softmax(q_i k^T * scale),   q, k = qkv(norm1(x)) of head h, after q_norm / k_norm

No function here materializes a full N x N matrix unless its caller asks for all rows: ViT-L/16 at
2048 x 2048 has N = 16385 tokens and 16 heads (17 GB as one float32 matrix), and the first T2T layer has
262144 tokens there. One row costs O(N); products of a vector with the whole matrix (attention rollout,
the attention a token receives) walk the query rows in chunks whose scores stay under 128 MiB.

Attention rollout (Abnar & Zuidema, 2020) of the class token is the class row of Â_L ... Â_1 with
Â_l = 0.5 mean_heads(A_l) + 0.5 I, computed as a vector-matrix chain from the last block backwards. The
rows of Â_l already sum to 1 (softmax rows do), so the paper's row renormalization changes nothing.

The Tokens-to-Token module's restructurization layers are covered as well: a ``TokenTransformer`` is a
single-head softmax attention; a ``TokenPerformer`` attends through positive random features φ, and the
matrix it applies to v is the normalized kernel A_ij = φ(q_i)·φ(k_j) / (φ(q_i)·Σ_j φ(k_j) + ε), whose
vector products cost O(N).

Everything is computed in float32 (whatever the tokens' dtype) on the tokens' device; maps and rows are
returned on the CPU (``rollout_row``'s, on the tokens' device). Hooks follow :mod:`t2t_viz.capture`: a
model is shared by many sessions, so each call gets its own inputs: the pass runs through
:func:`t2t_viz.capture.hooked_pass`, whose hooks record only for the call that registered them and are
always removed.
"""
from __future__ import annotations

import abc
import functools
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental import _config as fx_config
from timm.layers import Attention
from timm.models.vision_transformer import Block as VitBlock

from . import memory
from .capture import StopForward, hook_owner, hooked_pass
from .models.t2t_vit import T2TViT, TokenPerformer, TokenTransformer

__all__ = [
    'AttentionMaps', 'Position', 'token_grid', 't2t_layer_grid', 'query_index',
    'block_inputs', 't2t_layer_inputs', 'attention_rows', 'attention_map', 'received_attention', 'rollout_row',
    'attention_maps', 'attention_rollout', 'rollout_bytes', 't2t_attention_map', 't2t_received_attention',
]

Position = Tuple[int, int]  # (row, col) of a token on its grid

_CHUNK_ELEMENTS = 1 << 25  # attention scores per chunk of query rows (128 MiB in float32)
_META_NONZERO_LOCK = threading.Lock()  # two traces at once: the first to leave would unset the other's flag


@dataclass
class AttentionMaps:
    """Attention weights over the tokens of a grid, for a batch of images."""
    maps: torch.Tensor  # (B, K, h, w): K heads, or 1 (rollout, single-head T2T layers)
    prefix: torch.Tensor  # (B, K, P): the weight on the class/prefix tokens, which ``maps`` leaves out
    grid: Tuple[int, int]  # (h, w)

    @property
    def mean(self) -> torch.Tensor:
        """Mean over heads, (B, h, w)."""
        return self.maps.mean(dim=1)

    def cpu(self) -> AttentionMaps:
        return AttentionMaps(self.maps.cpu(), self.prefix.cpu(), self.grid)


def token_grid(model: nn.Module, height: int, width: int) -> Tuple[int, int]:
    """Backbone token grid (h, w) of ``model`` for an input of height x width."""
    if isinstance(model, T2TViT):
        return tuple(model.token_grid(height, width))
    patch_embed = getattr(model, 'patch_embed', None)
    if patch_embed is not None and hasattr(patch_embed, 'dynamic_feat_size'):
        return tuple(patch_embed.dynamic_feat_size((height, width)))
    raise TypeError(f'{type(model).__name__} is neither a T2T-ViT nor a timm ViT with a patch embedding')


def t2t_layer_grid(model: T2TViT, layer: int, height: int, width: int) -> Tuple[int, int]:
    """Token grid (h, w) of T2T restructurization layer ``layer`` (1 or 2) for an input of height x width."""
    _t2t_layer(model, layer)
    return tuple(model.tokens_to_token.grid_sizes(height, width)[layer - 1])


def query_index(grid: Tuple[int, int], query: Optional[Position], num_prefix_tokens: int) -> int:
    """Index in the token sequence of the token at ``query`` = (row, col) on ``grid``; None: the class token."""
    if query is None:
        if num_prefix_tokens < 1:
            raise ValueError('these tokens have no class token; give a query position (row, col)')
        return 0
    row, col = query
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise IndexError(f'query {tuple(query)} is outside the {grid[0]}x{grid[1]} token grid')
    return num_prefix_tokens + row * grid[1] + col


class _InputRecorder:
    """The inputs that one call's pre-hooks record, keyed by what the caller asked for."""

    def __init__(self, last: int):
        self.last = last
        self.inputs: Dict[int, torch.Tensor] = {}


def _record_input(owner: _InputRecorder, key: int, module: nn.Module, args: tuple) -> None:
    if hook_owner() is not owner:
        return  # a forward pass of another caller
    # copied: the pass goes on after this hook and could write into the tensor in place
    owner.inputs[key] = args[0].detach().clone()
    if key == owner.last:
        raise StopForward


def _capture_inputs(model: nn.Module, x: torch.Tensor, modules: Dict[int, nn.Module], last: int
                    ) -> Dict[int, torch.Tensor]:
    """Inputs of ``modules`` in one forward pass of ``x``, stopped once the input of ``modules[last]`` is in."""
    recorder = _InputRecorder(last)
    hooked_pass(model, x, recorder, [(module, functools.partial(_record_input, recorder, key))
                                     for key, module in modules.items()], pre=True)
    missing = sorted(set(modules) - set(recorder.inputs))
    if missing:
        raise RuntimeError(f'the forward pass never ran {missing}')
    return {key: recorder.inputs[key] for key in sorted(modules)}


def _block_indices(model: nn.Module, indices: Sequence[int]) -> List[int]:
    depth = len(model.blocks)
    for index in indices:
        if not -depth <= index < depth:
            raise IndexError(f'block {index} does not exist in a model of {depth} blocks')
    return sorted({index % depth for index in indices})


def block_inputs(model: nn.Module, x: torch.Tensor, indices: Sequence[int]) -> Dict[int, torch.Tensor]:
    """Input tokens (B, P+N, C) of ``model.blocks[i]`` for each i in ``indices``, from one forward pass of x.

    ``x`` is (B, 3, H, W). Keys are the non-negative block indices (-1 gives the last block's index). The
    pass runs under ``torch.inference_mode()`` and stops once the last requested input is recorded; the
    tokens stay on the model's device, in its dtype, class/prefix tokens first.
    """
    indices = _block_indices(model, indices)
    if not indices:
        return {}
    return _capture_inputs(model, x, {i: model.blocks[i] for i in indices}, indices[-1])


def _t2t_layer(model: T2TViT, layer: int) -> nn.Module:
    if not isinstance(model, T2TViT):
        raise TypeError(f'{type(model).__name__} has no Tokens-to-Token module')
    if layer not in (1, 2):
        raise ValueError(f'T2T restructurization layers are 1 and 2, not {layer}')
    return getattr(model.tokens_to_token, f'attention{layer}')


def t2t_layer_inputs(model: T2TViT, x: torch.Tensor, layers: Sequence[int] = (1, 2)) -> Dict[int, torch.Tensor]:
    """Input tokens (B, N_l, C_l) of T2T restructurization layers 1 and/or 2, from one (early-stopped) pass.

    These are the soft split outputs the layers read: 3*7*7 = 147 wide on the first grid, token_dim*9 on
    the second (see :func:`t2t_layer_grid`).
    """
    modules = {layer: _t2t_layer(model, layer) for layer in layers}
    if not modules:
        return {}
    return _capture_inputs(model, x, modules, max(modules))


def _in_float32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in the module's own dtype (it may be float16), returned as float32."""
    param = next(module.parameters(), None)
    return module(x.to(torch.float32 if param is None else param.dtype)).float()


def _linear_float32(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight.float(), None if bias is None else bias.float())


def _split_linear(linear: nn.Linear, width: int) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(weight, bias) of each ``width``-wide output slice of ``linear``, in order."""
    weights = linear.weight.split(width)
    biases = [None] * len(weights) if linear.bias is None else linear.bias.split(width)
    return list(zip(weights, biases))


class _RowSource(abc.ABC):
    """One layer's attention matrix for one batch of tokens, row by row; keys are computed once."""
    num_heads: int
    num_tokens: int
    batch_size: int

    @abc.abstractmethod
    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        """Attention rows of the query tokens ``queries`` (Q,): (B, heads, Q, T), float32."""

    def chunk_rows(self, chunk_size: Optional[int]) -> int:
        if chunk_size is not None:
            return max(1, chunk_size)
        return max(1, _CHUNK_ELEMENTS // (self.batch_size * self.num_heads * self.num_tokens))

    def vector_product(self, vector: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """``vector`` (B, T) times each head's matrix, Σ_i vector_i A[h, i, :]: (B, heads, T).

        Only query rows where some image's weight is non-zero are computed, in chunks of rows.
        """
        out = vector.new_zeros(self.batch_size, self.num_heads, self.num_tokens)  # (B, H, T)
        support = vector.ne(0).any(dim=0).nonzero().flatten()  # query rows that contribute
        for queries in support.split(self.chunk_rows(chunk_size)):
            weights = vector[:, queries][:, None, None, :]  # (B, 1, 1, Q)
            out += (weights @ self.rows(queries)).squeeze(2)  # (B, H, T)
        return out


class _SoftmaxRows(_RowSource):
    """softmax(q k^T * scale) per head, q computed per chunk of query rows."""

    def __init__(self, x: torch.Tensor, q_projection: Tuple[torch.Tensor, Optional[torch.Tensor]],
                 k: torch.Tensor, scale: float, q_norm: Callable[[torch.Tensor], torch.Tensor]):
        self.x = x  # (B, T, C) normalized block input, float32
        self.q_projection = q_projection  # (weight (H*D, C), bias (H*D,) or None)
        self.k = k  # (B, H, T, D) float32, after k_norm
        self.scale, self.q_norm = scale, q_norm
        self.batch_size, self.num_heads, self.num_tokens, self.head_dim = k.shape

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        q = _linear_float32(self.x[:, queries], *self.q_projection)  # (B, Q, H*D)
        q = q.view(B, len(queries), H, D).transpose(1, 2)  # (B, H, Q, D)
        q = self.q_norm(q) * self.scale
        return (q @ self.k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, Q, T)


def _vit_block_rows(block: VitBlock, tokens: torch.Tensor) -> _SoftmaxRows:
    """Rows of a pre-norm timm ViT block (also T2T-ViT's backbone blocks), as timm's ``Attention`` computes them."""
    attn = block.attn
    if type(attn).forward is not Attention.forward:
        raise TypeError(f'{type(attn).__name__} is not a timm Attention; its attention cannot be recomputed here')
    B, T, _ = tokens.shape
    x = _in_float32(block.norm1, tokens)  # (B, T, C)
    q_projection, (k_weight, k_bias), _ = _split_linear(attn.qkv, attn.num_heads * attn.head_dim)
    k = _linear_float32(x, k_weight, k_bias).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = _in_float32(attn.k_norm, k)
    return _SoftmaxRows(x, q_projection, k, attn.scale, functools.partial(_in_float32, attn.q_norm))


def _token_transformer_rows(layer: TokenTransformer, tokens: torch.Tensor) -> _SoftmaxRows:
    """Rows of the T2T module's single-head Transformer layer (q, k, v = qkv(norm1(x)), in that order)."""
    B, T, _ = tokens.shape
    attn = layer.attn
    x = _in_float32(layer.norm1, tokens)  # (B, T, C_in)
    q_projection, (k_weight, k_bias), _ = _split_linear(attn.qkv, attn.token_dim)
    k = _linear_float32(x, k_weight, k_bias).unsqueeze(1)  # (B, 1, T, token_dim)
    return _SoftmaxRows(x, q_projection, k, attn.scale, lambda q: q)


class _KernelRows(_RowSource):
    """A ``TokenPerformer``'s normalized kernel attention, φ(q_i)·φ(k_j) / (φ(q_i)·Σ_j φ(k_j) + ε)."""

    def __init__(self, layer: TokenPerformer, tokens: torch.Tensor):
        self.layer = layer
        self.x = _in_float32(layer.norm1, tokens)  # (B, T, C_in)
        (k_weight, k_bias), self.q_projection, _ = _split_linear(layer.kqv, layer.token_dim)  # release order k, q, v
        self.k_features = layer._random_features(_linear_float32(self.x, k_weight, k_bias))  # (B, T, m)
        self.k_feature_sum = self.k_features.sum(dim=1).unsqueeze(-1)  # (B, m, 1)
        self.batch_size, self.num_tokens, _ = self.k_features.shape
        self.num_heads = 1

    def _query_features(self, queries: Union[torch.Tensor, slice]) -> Tuple[torch.Tensor, torch.Tensor]:
        """φ(q) (B, Q, m) of the query tokens and their normalizers φ(q)·Σ_j φ(k_j) + ε (B, Q, 1)."""
        q_features = self.layer._random_features(_linear_float32(self.x[:, queries], *self.q_projection))
        return q_features, q_features @ self.k_feature_sum + self.layer.epsilon

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        q_features, normalizer = self._query_features(queries)
        return ((q_features @ self.k_features.transpose(1, 2)) / normalizer).unsqueeze(1)  # (B, 1, Q, T)

    def vector_product(self, vector: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        # linear in T: Σ_i v_i φ(q_i)/n_i is one (B, m) vector, then a product with every φ(k_j)
        support = vector.ne(0).any(dim=0).nonzero().flatten()
        if len(support) == self.num_tokens:
            support = slice(None)  # every token: no copy of the tokens
        q_features, normalizer = self._query_features(support)  # (B, Q, m), (B, Q, 1)
        mixed = (vector[:, support].unsqueeze(-1) * q_features / normalizer).sum(dim=1)  # (B, m)
        return (self.k_features @ mixed.unsqueeze(-1)).transpose(1, 2)  # (B, 1, T)


def _row_source(layer: nn.Module, tokens: torch.Tensor) -> _RowSource:
    if isinstance(layer, VitBlock):
        return _vit_block_rows(layer, tokens)
    if isinstance(layer, TokenTransformer):
        return _token_transformer_rows(layer, tokens)
    if isinstance(layer, TokenPerformer):
        return _KernelRows(layer, tokens)
    raise TypeError(f'cannot recompute the attention of a {type(layer).__name__} '
                    '(a timm ViT Block, TokenTransformer or TokenPerformer is needed)')


def _check_queries(queries: torch.Tensor, num_tokens: int) -> None:
    if queries.numel() and not (0 <= int(queries.min()) and int(queries.max()) < num_tokens):
        raise IndexError(f'query indices must lie in [0, {num_tokens})')


@torch.inference_mode()
def attention_rows(layer: nn.Module, tokens: torch.Tensor, queries: Union[int, Sequence[int], torch.Tensor],
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Attention rows of the query tokens ``queries`` over all tokens: (B, heads, Q, T) float32 on the CPU.

    ``layer`` is a timm ViT ``Block`` (T2T-ViT's backbone blocks too: ``norm1`` is applied to ``tokens``
    first, query 0 is the class token), a ``TokenTransformer`` or a ``TokenPerformer`` (heads = 1);
    ``tokens`` (B, T, C) is its input, e.g. from :func:`block_inputs`. Rows are computed ``chunk_size`` at
    a time (default: scores of a chunk stay under 128 MiB).
    """
    source = _row_source(layer, tokens)
    queries = torch.as_tensor(queries, dtype=torch.long).flatten()
    _check_queries(queries, source.num_tokens)
    out = torch.empty(source.batch_size, source.num_heads, len(queries), source.num_tokens)  # (B, H, Q, T)
    step = source.chunk_rows(chunk_size)
    for start in range(0, len(queries), step):
        chunk = queries[start:start + step]
        out[:, :, start:start + len(chunk)] = source.rows(chunk.to(tokens.device)).cpu()
    return out


def _on_grid(rows: torch.Tensor, grid: Tuple[int, int]) -> AttentionMaps:
    """Split (B, K, P+h*w) weights into the prefix part and (B, K, h, w) maps, on the rows' device."""
    B, K, T = rows.shape
    num_prefix = T - grid[0] * grid[1]
    if num_prefix < 0:
        raise ValueError(f'{T} tokens do not fill the {grid[0]}x{grid[1]} grid')
    rows = rows.float()
    return AttentionMaps(rows[:, :, num_prefix:].reshape(B, K, *grid), rows[:, :, :num_prefix], tuple(grid))


def _prefix_count(tokens: torch.Tensor, grid: Tuple[int, int]) -> int:
    return tokens.shape[1] - grid[0] * grid[1]


@torch.inference_mode()
def attention_map(layer: nn.Module, tokens: torch.Tensor, grid: Tuple[int, int],
                  query: Optional[Position] = None) -> AttentionMaps:
    """Each head's attention from the token at ``query`` = (row, col) on ``grid`` (None: the class token).

    ``tokens`` (B, P+h*w, C) is the input of ``layer`` (see :func:`attention_rows`); the P leading
    tokens are the class/prefix tokens, which the maps leave out and ``prefix`` keeps.
    """
    index = query_index(grid, query, _prefix_count(tokens, grid))
    return _on_grid(attention_rows(layer, tokens, [index])[:, :, 0], grid)  # row (B, H, T)


@torch.inference_mode()
def received_attention(layer: nn.Module, tokens: torch.Tensor, grid: Tuple[int, int],
                       chunk_size: Optional[int] = None) -> AttentionMaps:
    """Attention each token receives, averaged over all query tokens (the column means of A), per head.

    ``tokens`` (B, P+h*w, C) is the input of ``layer``; the P leading (class/prefix) tokens' share is
    ``prefix``. Computed in chunks of query rows for softmax layers, in O(T) for a ``TokenPerformer``.
    """
    source = _row_source(layer, tokens)
    B, T = source.batch_size, source.num_tokens
    uniform = torch.full((B, T), 1.0 / T, device=tokens.device)  # (B, T)
    return _on_grid(source.vector_product(uniform, chunk_size), grid).cpu()


@torch.inference_mode()
def rollout_row(blocks: Sequence[nn.Module], inputs: Sequence[torch.Tensor], query: int = 0,
                chunk_size: Optional[int] = None) -> torch.Tensor:
    """Row ``query`` of Â_L ... Â_1 (Â_l = 0.5 mean_heads(A_l) + 0.5 I): (B, T) float32 on the inputs' device.

    ``blocks`` are ViT blocks in forward order and ``inputs`` their inputs (B, T, C) each. The row
    is a vector-matrix chain from the last block backwards: v <- v Â_l, each product computed from the
    block input in chunks of query rows, so no T x T matrix exists.
    """
    if len(blocks) != len(inputs) or not blocks:
        raise ValueError('give one input per block, and at least one block')
    B, T, _ = inputs[-1].shape
    _check_queries(torch.tensor([query]), T)
    vector = torch.zeros(B, T, device=inputs[-1].device)  # (B, T)
    vector[:, query] = 1.0
    for block, tokens in zip(reversed(blocks), reversed(inputs)):
        mixed = _row_source(block, tokens).vector_product(vector, chunk_size).mean(dim=1)  # (B, T): v mean_h(A)
        vector = 0.5 * mixed + 0.5 * vector
    return vector


def attention_maps(model: nn.Module, x: torch.Tensor, blocks: Sequence[int],
                   query: Optional[Position] = None) -> Dict[int, AttentionMaps]:
    """Per-head attention from the class token (or the token at ``query`` = (row, col)) in each of ``blocks``.

    One forward pass of ``x`` (B, 3, H, W) through a timm ViT or T2T-ViT, stopped after the last block
    requested; maps (B, heads, h, w) on the model's token grid, keyed by non-negative block index.
    """
    grid = token_grid(model, x.shape[-2], x.shape[-1])
    inputs = block_inputs(model, x, blocks)
    return {i: attention_map(model.blocks[i], tokens, grid, query) for i, tokens in inputs.items()}


def attention_rollout(model: nn.Module, x: torch.Tensor, first_block: int = 0, last_block: int = -1,
                      query: Optional[Position] = None, chunk_size: Optional[int] = None) -> AttentionMaps:
    """Attention rollout of the class token (or the token at ``query``) through blocks first..last (inclusive).

    Maps are (B, 1, h, w); ``prefix`` holds the share that stays on the class/prefix tokens. The pass keeps
    the input of every block in the range (B, T, C each) until the chain is done (see :func:`rollout_bytes`).
    """
    return _rollout(model, x, first_block, last_block, query, chunk_size).cpu()


def rollout_bytes(model: nn.Module, img_size: int, first_block: int = 0, last_block: int = -1) -> int:
    """Peak bytes of :func:`attention_rollout` for one ``img_size`` image, input included.

    Measured by running the rollout shape-only on ``model`` built on the meta device (see
    :mod:`t2t_viz.memory`), where no value tells which query rows contribute: all of them are computed,
    as they are from the second block of the chain on.
    """
    with _META_NONZERO_LOCK, fx_config.patch(meta_nonzero_assume_all_nonzero=True):  # a process-wide flag
        peak, _ = memory.measure_run(lambda x: _rollout(model, x, first_block, last_block, None, None),
                                     (1, 3, img_size, img_size))
    return peak


def _rollout(model: nn.Module, x: torch.Tensor, first_block: int, last_block: int, query: Optional[Position],
             chunk_size: Optional[int]) -> AttentionMaps:
    first, last = _block_indices(model, [first_block]) + _block_indices(model, [last_block])
    if first > last:
        raise ValueError(f'first_block {first_block} comes after last_block {last_block}')
    grid = token_grid(model, x.shape[-2], x.shape[-1])
    inputs = block_inputs(model, x, range(first, last + 1))
    index = query_index(grid, query, _prefix_count(inputs[last], grid))
    row = rollout_row([model.blocks[i] for i in inputs], list(inputs.values()), index, chunk_size)  # (B, T)
    return _on_grid(row.unsqueeze(1), grid)


def t2t_attention_map(model: T2TViT, x: torch.Tensor, layer: int, query: Position) -> AttentionMaps:
    """Attention (B, 1, h_l, w_l) of the token at ``query`` = (row, col) in T2T restructurization layer 1 or 2.

    The grid is that layer's own (:func:`t2t_layer_grid`); the pass stops at the layer's input.
    """
    grid = t2t_layer_grid(model, layer, x.shape[-2], x.shape[-1])
    tokens = t2t_layer_inputs(model, x, [layer])[layer]
    return attention_map(_t2t_layer(model, layer), tokens, grid, query)


def t2t_received_attention(model: T2TViT, x: torch.Tensor, layer: int,
                           chunk_size: Optional[int] = None) -> AttentionMaps:
    """Mean attention (B, 1, h_l, w_l) each token receives in T2T restructurization layer 1 or 2."""
    grid = t2t_layer_grid(model, layer, x.shape[-2], x.shape[-1])
    tokens = t2t_layer_inputs(model, x, [layer])[layer]
    return received_attention(_t2t_layer(model, layer), tokens, grid, chunk_size)

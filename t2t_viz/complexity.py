"""Parameter and MAC counts of the T2T-ViT family, measured next to the paper's table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['PaperEntry', 'PAPER_TABLE', 'count_parameters', 'count_macs', 'variant_table']


@dataclass(frozen=True)
class PaperEntry:
    name: str
    t2t_layer: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    params_m: float  # millions, as printed in the paper
    macs_g: float  # billions at 224x224, as printed in the paper


PAPER_TABLE = (
    PaperEntry('t2t_vit_7', 'performer', 256, 7, 4, 2, 4.3, 1.1),
    PaperEntry('t2t_vit_10', 'performer', 256, 10, 4, 2, 5.9, 1.5),
    PaperEntry('t2t_vit_12', 'performer', 256, 12, 4, 2, 6.9, 1.8),
    PaperEntry('t2t_vit_14', 'performer', 384, 14, 6, 3, 21.5, 4.8),
    PaperEntry('t2t_vit_19', 'performer', 448, 19, 7, 3, 39.2, 8.5),
    PaperEntry('t2t_vit_24', 'performer', 512, 24, 8, 3, 64.1, 13.8),
    PaperEntry('t2t_vit_t_14', 'transformer', 384, 14, 6, 3, 21.5, 6.1),
    PaperEntry('t2t_vit_t_19', 'transformer', 448, 19, 7, 3, 39.2, 9.8),
    PaperEntry('t2t_vit_t_24', 'transformer', 512, 24, 8, 3, 64.1, 15.0),
)


def count_parameters(model: torch.nn.Module) -> int:
    """All stored numbers, as the paper counts them: its position table and Performer ``w`` were
    (frozen) parameters; here they are buffers."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, num_queries, head_dim = query_shape
    num_keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * num_queries * num_keys * (head_dim + value_dim)  # q @ k^T and attn @ v


_FUSED_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
}


def count_macs(model: torch.nn.Module, img_size: int = 224) -> int:
    """Multiply-accumulates of one full forward pass at ``img_size`` (torch's counter, plus CPU fused attention).

    Counts ``forward_head(forward_features(x))`` where the model has them: the whole network, as papers
    count it, not T2T-ViT's ``forward`` shortcut that skips the last block's patch-token work.
    """
    x = torch.zeros(1, 3, img_size, img_size)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_FUSED_ATTENTION_OPS) as counter:
        if hasattr(model, 'forward_features') and hasattr(model, 'forward_head'):
            model.forward_head(model.forward_features(x))
        else:
            model(x)
    return counter.get_total_flops() // 2


def variant_table(img_size: int = 224) -> List[dict]:
    """One row per variant: the paper's numbers next to the measured ones."""
    rows = []
    for entry in PAPER_TABLE:
        model = timm.create_model(entry.name)
        rows.append(dict(
            name=entry.name, t2t_layer=entry.t2t_layer, embed_dim=entry.embed_dim, depth=entry.depth,
            num_heads=entry.num_heads, mlp_ratio=entry.mlp_ratio,
            params_m=count_parameters(model) / 1e6, paper_params_m=entry.params_m,
            macs_g=count_macs(model, img_size) / 1e9, paper_macs_g=entry.macs_g,
        ))
    return rows

"""Receptive boxes equal the input pixels a grid position actually depends on (the support of its gradient)."""
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from t2t_viz.receptive import input_box, layer_geometry


def _support(output_at, x: torch.Tensor):
    """(top, left, bottom, right) of the input pixels whose gradient is nonzero, by numpy."""
    x = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(output_at(x), x)
    rows, cols = np.nonzero(gradient.abs().sum(dim=(0, 1)).numpy())
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def _all_active_resnet18() -> nn.Module:
    """resnet18 whose ReLUs pass everything for a positive input, and whose max pool is an average pool of the
    same geometry, so that every pixel of a receptive field has a nonzero gradient."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18').eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.abs_()
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.fill_(0.1)
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
    model.maxpool = nn.AvgPool2d(3, 2, 1)
    return model


@pytest.mark.parametrize('layer,row,col', [('act1', 0, 0), ('act1', 40, 77), ('layer1.1.act1', 20, 31),
                                           ('layer2', 3, 27), ('layer3', 7, 7), ('layer3.0.act1', 13, 2)])
def test_resnet_boxes_are_the_gradient_support(layer, row, col):
    model = _all_active_resnet18()
    x = torch.rand(1, 3, 224, 224) + 0.1
    outputs = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: outputs.__setitem__('o', o))

    def output_at(inputs):
        model(inputs)
        return outputs['o'][0, :, row, col].sum()

    try:
        support = _support(output_at, x)
    finally:
        handle.remove()
    grid = outputs['o'].shape[-2:]
    model.maxpool = nn.MaxPool2d(3, 2, 1)  # the geometry is the max pool's, as in the real model
    assert input_box(layer_geometry(model, layer, 'relu', tuple(grid), (224, 224)), row, col, (224, 224)) == support


@pytest.mark.parametrize('used,row,col', [(1, 0, 0), (1, 30, 55), (2, 14, 27), (3, 0, 13), (3, 6, 9)])
def test_t2t_boxes_are_the_support_of_the_composed_soft_splits(used, row, col):
    torch.manual_seed(0)
    model = timm.create_model('t2t_vit_7').eval()
    t2t = model.tokens_to_token
    splits = [t2t.soft_split0, t2t.soft_split1, t2t.soft_split2]
    grids = t2t.grid_sizes(224, 224)

    def output_at(inputs):
        tokens = splits[0](inputs)  # (1, N, C)
        for split, grid in zip(splits[1:used], grids):
            tokens = split(tokens.transpose(1, 2).reshape(1, -1, *grid))
        return tokens[0, row * grids[used - 1][1] + col].sum()

    support = _support(output_at, torch.rand(1, 3, 224, 224) + 0.1)
    layer = {1: 'tokens_to_token.soft_split0', 2: 'tokens_to_token.soft_split1', 3: 'blocks.2'}[used]
    geometry = layer_geometry(model, layer, 'block', grids[used - 1], (224, 224))
    assert input_box(geometry, row, col, (224, 224)) == support


def test_patch_tokens_cover_their_patch_at_any_grid():
    model = timm.create_model('vit_tiny_patch16_224')
    geometry = layer_geometry(model, 'blocks.3', 'block', (64, 64), (1024, 1024))
    assert input_box(geometry, 63, 2, (1024, 1024)) == (1008, 32, 1024, 48)

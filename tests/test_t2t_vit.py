"""The T2T-ViT family: architecture, sizes, shapes and the forward API."""
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from t2t_viz.complexity import PAPER_TABLE, count_macs, count_parameters
from t2t_viz.models import T2TViT, sinusoid_position_table


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return timm.create_model('t2t_vit_7').eval()


@pytest.mark.parametrize('entry', PAPER_TABLE, ids=lambda e: e.name)
def test_params_and_macs_match_paper(entry):
    model = timm.create_model(entry.name)
    assert isinstance(model, T2TViT)
    assert round(count_parameters(model) / 1e6, 1) == entry.params_m
    macs_g = count_macs(model) / 1e9
    assert abs(macs_g - entry.macs_g) <= 0.06 + 0.015 * entry.macs_g, macs_g


def test_architecture_matches_table():
    for entry in PAPER_TABLE:
        model = timm.create_model(entry.name)
        t2t = model.tokens_to_token
        layer_type = type(t2t.attention1).__name__
        assert layer_type == {'performer': 'TokenPerformer', 'transformer': 'TokenTransformer'}[entry.t2t_layer]
        assert (model.embed_dim, len(model.blocks)) == (entry.embed_dim, entry.depth)
        assert model.blocks[0].attn.num_heads == entry.num_heads
        assert model.blocks[0].mlp.fc1.out_features == entry.embed_dim * entry.mlp_ratio
        assert model.blocks[0].attn.qkv.bias is None
        splits = [(s.kernel_size, s.stride, s.padding) for s in (t2t.soft_split0, t2t.soft_split1, t2t.soft_split2)]
        assert splits == [(7, 4, 2), (3, 2, 1), (3, 2, 1)]
        assert t2t.project.in_features == 64 * 9 and t2t.project.out_features == entry.embed_dim


def test_release_parameter_names():
    names = set(timm.create_model('t2t_vit_24').state_dict())
    for key in ('tokens_to_token.attention1.kqv.weight', 'tokens_to_token.attention1.w',
                'tokens_to_token.attention2.mlp.2.weight', 'tokens_to_token.project.weight',
                'blocks.0.attn.qkv.weight', 'blocks.23.mlp.fc2.bias', 'pos_embed', 'cls_token', 'norm.weight',
                'head.weight'):
        assert key in names
    names_t = set(timm.create_model('t2t_vit_t_14').state_dict())
    for key in ('tokens_to_token.attention1.attn.qkv.weight', 'tokens_to_token.attention1.attn.proj.weight',
                'tokens_to_token.attention2.mlp.fc1.weight'):
        assert key in names_t
    assert 'tokens_to_token.attention1.attn.qkv.bias' not in names_t


def test_position_table_is_fixed_sinusoid():
    n, d = 197, 64
    expected = np.array([[pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for pos in range(n)])
    expected[:, 0::2] = np.sin(expected[:, 0::2])
    expected[:, 1::2] = np.cos(expected[:, 1::2])
    table = sinusoid_position_table(n, d)
    assert table.shape == (1, n, d)
    np.testing.assert_allclose(table[0].numpy(), expected, atol=1e-6)
    model = timm.create_model('t2t_vit_7')
    assert 'pos_embed' not in dict(model.named_parameters())  # never trained
    assert torch.equal(model.state_dict()['pos_embed'], sinusoid_position_table(197, 256))


def test_backbone_attention_uses_head_dim_scale(tiny):
    attn = tiny.blocks[0].attn
    torch.manual_seed(1)
    x = torch.randn(2, 197, 256)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 4, 64).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * 64 ** -0.5).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_transformer_t2t_layer_scale_and_v_residual():
    torch.manual_seed(2)
    layer = timm.create_model('t2t_vit_t_14').tokens_to_token.attention1.attn
    x = torch.randn(2, 50, 147)
    q, k, v = layer.qkv(x).split(64, dim=-1)
    weights = ((q * 147 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    expected = v + layer.proj(weights @ v)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_performer_t2t_layer_formula(tiny):
    layer = tiny.tokens_to_token.attention2
    assert layer.w.shape == (32, 64) and not layer.w.requires_grad
    torch.manual_seed(3)
    x = torch.randn(2, 40, 576)
    k, q, v = layer.kqv(x).split(64, dim=-1)

    def phi(t):
        return torch.exp(t @ layer.w.t() - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(32)

    qp, kp = phi(q), phi(k)
    y = torch.einsum('btm,bnm->btn', qp, torch.einsum('bin,bim->bnm', v, kp))
    y = y / (torch.einsum('btm,bm->bt', qp, kp.sum(1)).unsqueeze(-1) + 1e-8)
    expected = v + layer.proj(y)
    torch.testing.assert_close(layer.attention(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('size,grids', [
    ((224, 224), [(56, 56), (28, 28), (14, 14)]),
    ((384, 384), [(96, 96), (48, 48), (24, 24)]),
    ((224, 320), [(56, 80), (28, 40), (14, 20)]),
])
def test_shapes_and_stages(size, grids):
    torch.manual_seed(0)
    model = timm.create_model('t2t_vit_7', img_size=size).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
        features = model.forward_features(x)
        stages = model.forward_t2t_stages(x)
    n = grids[2][0] * grids[2][1]
    assert features.shape == (2, 1 + n, 256)
    assert model.grid_size == grids[2]
    assert [s.name for s in stages] == [
        'input', 'soft_split1', 'restructurization1', 'soft_split2', 'restructurization2', 'soft_split3',
        'projection']
    expected = [(size, 3), (grids[0], 147), (grids[0], 64), (grids[1], 576), (grids[1], 64), (grids[2], 576),
                (grids[2], 256)]
    assert [(s.grid, s.width) for s in stages] == expected
    for stage in stages:
        assert stage.num_tokens == stage.grid[0] * stage.grid[1]
        assert stage.feature_map.shape == (2, stage.width, *stage.grid)
    # the projected tokens are what the backbone receives (before class token and positions)
    torch.testing.assert_close(stages[-1].tokens, model.tokens_to_token(x))


def test_stage_token_counts_at_224_and_384():
    model = timm.create_model('t2t_vit_7')
    assert [g[0] * g[1] for g in model.tokens_to_token.grid_sizes(224, 224)] == [3136, 784, 196]
    assert [g[0] * g[1] for g in model.tokens_to_token.grid_sizes(384, 384)] == [9216, 2304, 576]


def test_soft_split_is_overlapping_unfold(tiny):
    x = torch.randn(1, 3, 224, 224)
    tokens = tiny.tokens_to_token.soft_split0(x)
    torch.testing.assert_close(tokens, F.unfold(x, 7, padding=2, stride=4).transpose(1, 2))


def test_forward_intermediates_agree_with_forward_features(tiny):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = tiny.forward_features(x)
        final, intermediates = tiny.forward_intermediates(x)
        nlc = tiny.forward_intermediates(x, indices=[0, 6], output_fmt='NLC', intermediates_only=True)
        normed = tiny.forward_intermediates(x, indices=1, norm=True, intermediates_only=True, stop_early=True,
                                            return_prefix_tokens=True)
    torch.testing.assert_close(final, features)
    assert len(intermediates) == 7 and intermediates[0].shape == (2, 256, 14, 14)
    spatial, cls = normed[0]
    torch.testing.assert_close(spatial, features[:, 1:].transpose(1, 2).reshape(2, 256, 14, 14))
    torch.testing.assert_close(cls, features[:, :1])
    torch.testing.assert_close(nlc[1], intermediates[6].flatten(2).transpose(1, 2))
    logits = tiny.forward_head(features)
    torch.testing.assert_close(logits, tiny.head(features[:, 0]))


@pytest.mark.parametrize('kwargs', [
    dict(t2t_layer='performer'), dict(t2t_layer='transformer', qkv_bias=True), dict(global_pool='avg'),
    dict(token_label_head=True)], ids=['performer', 'transformer-qkv-bias', 'avg-pool', 'token-label'])
def test_forward_gives_the_logits_of_forward_features(kwargs):
    torch.manual_seed(0)
    model = T2TViT(embed_dim=64, depth=3, num_heads=2, **kwargs).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # only a class-token head with nothing watching lets forward skip the last block's patch-token work
    assert model._class_token_suffices() == (kwargs.get('global_pool', 'token') == 'token'
                                             and 'token_label_head' not in kwargs)


def test_forward_runs_every_module_while_hooks_watch(tiny):
    seen = {}
    x = torch.randn(1, 3, 224, 224)
    for module in (tiny.blocks[-1].mlp, tiny.blocks, tiny.norm):
        handle = module.register_forward_hook(lambda m, i, output: seen.__setitem__('shape', output.shape))
        try:
            with torch.no_grad():
                tiny(x)
        finally:
            handle.remove()
        assert seen.pop('shape')[1] == 197, module  # class token + 14x14 patch tokens
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m))
    try:
        with torch.no_grad():
            tiny(x)
    finally:
        handle.remove()
    assert tiny.blocks[-1] in calls and tiny.blocks[-1].mlp in calls
    assert tiny._class_token_suffices() and not tiny.train()._class_token_suffices()
    tiny.eval()


def test_wrong_input_size_is_a_clear_error_unless_dynamic(tiny):
    with pytest.raises(ValueError, match='built for 224x224'):
        tiny(torch.randn(1, 3, 256, 256))
    dynamic = timm.create_model('t2t_vit_7', dynamic_img_size=True).eval()
    with torch.no_grad():
        assert dynamic(torch.randn(1, 3, 256, 320)).shape == (1, 1000)
        _, inter = dynamic.forward_intermediates(torch.randn(1, 3, 256, 320), indices=1)
    assert inter[0].shape == (1, 256, 16, 20)


def test_token_label_variant_adds_aux_head():
    model = timm.create_model('t2t_vit_24.tl_in1k')
    assert model.aux_head is not None and model.aux_head.weight.shape == (1000, 512)
    small = T2TViT(embed_dim=64, depth=1, num_heads=2, token_label_head=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = small.forward_features(x)
        expected = small.head(features[:, 0]) + 0.5 * small.aux_head(features[:, 1:]).max(1).values
        torch.testing.assert_close(small(x), expected)


def test_pretrained_configs_name_release_files():
    for name in ('t2t_vit_7.in1k', 't2t_vit_14.in1k_384', 't2t_vit_24.in1k', 't2t_vit_24.tl_in1k',
                 't2t_vit_t_24.in1k'):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url.startswith('https://github.com/yitu-opensource/T2T-ViT/releases/download/main/')
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.interpolation == 'bicubic'
    assert timm.models.get_pretrained_cfg('t2t_vit_24.in1k').url.endswith('82.3_T2T_ViT_24.pth.tar')
    assert timm.models.get_pretrained_cfg('t2t_vit_14.in1k_384').input_size == (3, 384, 384)
    assert set(timm.list_models('t2t_vit*')) >= {e.name for e in PAPER_TABLE}

"""Attention maps recomputed from block inputs: equal to the matrices the models' unfused paths build."""
import copy
import threading

import pytest
import timm
import torch
import torch.nn as nn

from t2t_viz import memory, zoo
from t2t_viz.attention import (
    attention_maps, attention_rollout, attention_rows, block_inputs, query_index, received_attention, rollout_bytes,
    rollout_row, t2t_attention_map, t2t_layer_grid, t2t_layer_inputs, t2t_received_attention, token_grid)

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def sharpen(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Larger q/k weights than the initialization's, so attention rows are far from uniform."""
    torch.manual_seed(1)
    for block in model.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=std)
        if block.attn.qkv.bias is not None:
            nn.init.normal_(block.attn.qkv.bias, std=0.5)
    return model


def unfused(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def reference_matrices(cloned_outputs, model: nn.Module, x: torch.Tensor) -> dict:
    """Every block's full softmax matrix (B, H, T, T), from timm's unfused path (through ``attn_drop``)."""
    names = [f'blocks.{i}.attn.attn_drop' for i in range(len(model.blocks))]
    outputs = cloned_outputs(model, x, names)
    return {i: outputs[name] for i, name in enumerate(names)}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """These tensors are small; one intra-op thread keeps them fast on a machine whose cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def vit():
    torch.manual_seed(0)
    return unfused(sharpen(timm.create_model('vit_tiny_patch16_224').eval()))


@pytest.fixture(scope='module')
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 224, 224)


@pytest.fixture(scope='module')
def vit_reference(vit, images, cloned_outputs):
    return reference_matrices(cloned_outputs, vit, images)


@pytest.fixture(scope='module')
def t2t7():
    """Performer T2T layers, built for a non-square input."""
    torch.manual_seed(0)
    model = timm.create_model('t2t_vit_7', img_size=(224, 160)).eval()
    # per-dimension q and k of about 0.35: peaked attention, kernel values well above the layer's epsilon
    nn.init.normal_(model.tokens_to_token.attention1.kqv.weight, std=0.03)  # 147 inputs
    nn.init.normal_(model.tokens_to_token.attention2.kqv.weight, std=0.015)  # 576 inputs
    for layer in (model.tokens_to_token.attention1, model.tokens_to_token.attention2):
        nn.init.normal_(layer.kqv.bias, std=0.1)  # trained biases are not the initialization's zeros
    return unfused(sharpen(model))


def test_vit_rows_match_unfused_reference(vit, images, vit_reference):
    inputs = block_inputs(vit, images, [0, 5, -1])
    assert sorted(inputs) == [0, 5, 11]
    assert inputs[5].shape == (2, 197, 192)
    queries = [0, 1, 40, 196]
    for i, tokens in inputs.items():
        rows = attention_rows(vit.blocks[i], tokens, queries, chunk_size=3)
        assert rows.shape == (2, 3, 4, 197) and rows.dtype == torch.float32 and rows.device.type == 'cpu'
        torch.testing.assert_close(rows, vit_reference[i][:, :, queries], **TOLERANCE)
        # the reference is far from uniform, so a wrong head split or scale could not pass
        assert vit_reference[i][:, :, queries].max() > 10 / 197


def test_vit_class_and_query_maps(vit, images, vit_reference):
    assert token_grid(vit, 224, 224) == (14, 14)
    maps = attention_maps(vit, images, [3, 8])
    for i in (3, 8):
        reference = vit_reference[i][:, :, 0]  # (B, H, T): the class token's row
        assert maps[i].grid == (14, 14)
        torch.testing.assert_close(maps[i].maps, reference[:, :, 1:].reshape(2, 3, 14, 14), **TOLERANCE)
        torch.testing.assert_close(maps[i].prefix, reference[:, :, :1], **TOLERANCE)
        torch.testing.assert_close(maps[i].mean, reference[:, :, 1:].mean(1).reshape(2, 14, 14), **TOLERANCE)

    row, col = 2, 13
    query_maps = attention_maps(vit, images, [8], query=(row, col))[8]
    index = query_index((14, 14), (row, col), 1)
    assert index == 1 + row * 14 + col
    reference = vit_reference[8][:, :, index]
    torch.testing.assert_close(query_maps.maps, reference[:, :, 1:].reshape(2, 3, 14, 14), **TOLERANCE)


def test_vit_received_attention(vit, images, vit_reference):
    tokens = block_inputs(vit, images, [4])[4]
    received = received_attention(vit.blocks[4], tokens, (14, 14), chunk_size=50)
    reference = vit_reference[4].mean(dim=2)  # (B, H, T): column means
    torch.testing.assert_close(received.maps, reference[:, :, 1:].reshape(2, 3, 14, 14), **TOLERANCE)
    torch.testing.assert_close(received.prefix, reference[:, :, :1], **TOLERANCE)


def test_qk_norm_and_low_precision_tokens(images, cloned_outputs):
    torch.manual_seed(0)
    model = unfused(sharpen(timm.create_model('vit_tiny_patch16_224', qk_norm=True).eval()))
    for block in model.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            nn.init.normal_(norm.weight, 1.0, 0.5)
            nn.init.normal_(norm.bias, 0.0, 0.5)
    x = images[:1]
    reference = reference_matrices(cloned_outputs, model, x)
    tokens = block_inputs(model, x, [6])[6]
    rows = attention_rows(model.blocks[6], tokens, [0, 100])
    torch.testing.assert_close(rows, reference[6][:, :, [0, 100]], **TOLERANCE)

    rows_bf16 = attention_rows(model.blocks[6], tokens.bfloat16(), [0, 100])
    assert rows_bf16.dtype == torch.float32
    torch.testing.assert_close(rows_bf16, rows, atol=0.05, rtol=0)


def test_rollout_matches_full_matrix_product(vit, images, vit_reference):
    T = 197
    eye = torch.eye(T)

    def explicit_rollout(first, last):
        product = eye.expand(2, T, T)
        for i in range(first, last + 1):
            augmented = 0.5 * vit_reference[i].mean(dim=1) + 0.5 * eye  # (B, T, T)
            augmented = augmented / augmented.sum(dim=-1, keepdim=True)
            product = augmented @ product  # Â_i ... Â_first
        return product

    full = explicit_rollout(0, 11)[:, 0]  # (B, T): the class token's row
    rollout = attention_rollout(vit, images, chunk_size=64)
    assert rollout.maps.shape == (2, 1, 14, 14)
    torch.testing.assert_close(rollout.maps[:, 0], full[:, 1:].reshape(2, 14, 14), **TOLERANCE)
    torch.testing.assert_close(rollout.prefix[:, 0], full[:, :1], **TOLERANCE)
    torch.testing.assert_close(rollout.maps.sum((1, 2, 3)) + rollout.prefix.sum((1, 2)), torch.ones(2))

    row, col = 5, 7
    partial = explicit_rollout(2, 7)[:, 1 + row * 14 + col]
    rollout = attention_rollout(vit, images, first_block=2, last_block=7, query=(row, col), chunk_size=30)
    torch.testing.assert_close(rollout.maps[:, 0], partial[:, 1:].reshape(2, 14, 14), **TOLERANCE)

    inputs = block_inputs(vit, images, [10, 11])
    torch.testing.assert_close(rollout_row([vit.blocks[10], vit.blocks[11]], [inputs[10], inputs[11]], query=0),
                               explicit_rollout(10, 11)[:, 0], **TOLERANCE)


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 't2t_vit_7'])
def test_rollout_bytes_are_what_the_real_rollout_allocates(name):
    """Traced shape-only (every query row taken to contribute); the real chain computes one row in its first
    product and all rows in the others, so the two peaks agree."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    with memory.LiveBytes() as real:
        attention_rollout(model, x, 0, 5, chunk_size=None)
    meta_model = zoo.build_on_meta(name)
    input_bytes = memory.INPUT_COPIES * x.numel() * 4
    assert rollout_bytes(meta_model, 224, 0, 5) - input_bytes == pytest.approx(real.peak, rel=0.02)


def test_rollout_bytes_grow_with_the_blocks_kept():
    """Every block's input is kept until the chain is done: at 1024, ViT-Tiny's 4097 tokens of 192 floats."""
    meta_model = zoo.build_on_meta('vit_tiny_patch16_224', 1024)
    block_input = 4097 * 192 * 4
    assert rollout_bytes(meta_model, 1024, 0, 11) - rollout_bytes(meta_model, 1024, 0, 1) >= 10 * block_input


def test_functions_leave_fused_forward_unchanged(images):
    torch.manual_seed(0)
    model = sharpen(timm.create_model('vit_tiny_patch16_224').eval())
    assert model.blocks[0].attn.fused_attn
    x = images[:1]
    with torch.inference_mode():
        before = model(x)
    attention_maps(model, x, [1, 6], query=(3, 4))
    attention_rollout(model, x)
    assert no_hooks(model)
    with pytest.raises(Exception):  # 100 px is not the model's fixed input size: patch_embed raises
        block_inputs(model, torch.randn(1, 3, 100, 100), [3])
    assert no_hooks(model)
    with torch.inference_mode():
        after = model(x)
    assert torch.equal(before, after)


def test_early_stop_runs_fewer_blocks(vit, images):
    calls = []
    handles = [block.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
               for i, block in enumerate(vit.blocks)]
    try:
        block_inputs(vit, images, [0])
        assert calls == []
        block_inputs(vit, images, [1, 3])
        assert calls == [0, 1, 2]
    finally:
        for handle in handles:
            handle.remove()
    assert no_hooks(vit)


def test_threads_get_their_own_inputs(vit, images):
    expected = {index: block_inputs(vit, images, [index])[index] for index in (2, 9)}
    barrier = threading.Barrier(2)
    results, errors = {2: [], 9: []}, []

    def work(index):
        try:
            barrier.wait()
            for _ in range(8):
                results[index].append(block_inputs(vit, images, [index]))
        except Exception as error:  # reported below; pytest does not see a thread's exceptions
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in (2, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, runs in results.items():
        assert len(runs) == 8
        for inputs in runs:
            assert list(inputs) == [index]
            torch.testing.assert_close(inputs[index], expected[index], atol=0, rtol=0)
    assert no_hooks(vit)


def test_t2t_transformer_layer_rows_match_explicit_softmax():
    torch.manual_seed(0)
    model = timm.create_model('t2t_vit_t_14', img_size=64).eval()
    t2t = model.tokens_to_token
    for layer in (t2t.attention1, t2t.attention2):
        nn.init.normal_(layer.attn.qkv.weight, std=0.15)
    x = torch.randn(2, 3, 64, 64)
    inputs = t2t_layer_inputs(model, x)
    stages = {stage.name: stage.tokens for stage in model.forward_t2t_stages(x)}
    torch.testing.assert_close(inputs[1], stages['soft_split1'])
    torch.testing.assert_close(inputs[2], stages['soft_split2'])
    assert no_hooks(model)

    for number, layer in ((1, t2t.attention1), (2, t2t.attention2)):
        tokens = inputs[number]
        grid = t2t_layer_grid(model, number, 64, 64)
        assert grid == {1: (16, 16), 2: (8, 8)}[number]
        with torch.inference_mode():
            x_norm = layer.norm1(tokens)
            q, k, v = layer.attn.qkv(x_norm).split(64, dim=-1)  # each (B, T, 64)
            explicit = (q @ k.transpose(1, 2) * tokens.shape[-1] ** -0.5).softmax(dim=-1)  # (B, T, T)
            # the explicit matrix is what the layer's fused attention applies
            torch.testing.assert_close(v + layer.attn.proj(explicit @ v), layer.attn(x_norm), **TOLERANCE)
        assert explicit.max() > 20 / tokens.shape[1]

        row, col = 3, 5
        index = row * grid[1] + col
        maps = t2t_attention_map(model, x, number, (row, col))
        assert maps.maps.shape == (2, 1, *grid) and maps.prefix.shape == (2, 1, 0)
        torch.testing.assert_close(maps.maps[:, 0], explicit[:, index].reshape(2, *grid), **TOLERANCE)
        received = t2t_received_attention(model, x, number, chunk_size=20)
        torch.testing.assert_close(received.maps[:, 0], explicit.mean(dim=1).reshape(2, *grid), **TOLERANCE)
    assert no_hooks(model)


def _performer_output_and_values(layer: nn.Module, tokens: torch.Tensor):
    """A TokenPerformer's attention output y (before ``proj``) and its values v, both (B, T, token_dim)."""
    captured = []
    handle = layer.proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    try:
        with torch.inference_mode():
            layer(tokens)
            v = layer.kqv(layer.norm1(tokens)).split(layer.token_dim, dim=-1)[2]  # release order k, q, v
    finally:
        handle.remove()
    return captured[0], v


def test_t2t_performer_kernel_matrix_gives_layer_output(t2t7):
    x = torch.randn(1, 3, 224, 160)
    t2t = t2t7.tokens_to_token
    inputs = t2t_layer_inputs(t2t7, x, [1, 2])
    for number, layer in ((1, t2t.attention1), (2, t2t.attention2)):
        tokens = inputs[number]
        grid = t2t_layer_grid(t2t7, number, 224, 160)
        assert grid == {1: (56, 40), 2: (28, 20)}[number]
        T = tokens.shape[1]
        matrix = attention_rows(layer, tokens, torch.arange(T))[:, 0]  # (B, T, T)
        y, v = _performer_output_and_values(layer, tokens)
        torch.testing.assert_close(matrix @ v, y, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(matrix.sum(dim=-1), torch.ones(1, T), **TOLERANCE)
        assert matrix.max() > 20 / T

        maps = t2t_attention_map(t2t7, x, number, (grid[0] - 1, 2))
        torch.testing.assert_close(maps.maps[:, 0], matrix[:, (grid[0] - 1) * grid[1] + 2].reshape(1, *grid),
                                   **TOLERANCE)
        received = t2t_received_attention(t2t7, x, number)
        torch.testing.assert_close(received.maps[:, 0], matrix.mean(dim=1).reshape(1, *grid), atol=1e-7, rtol=1e-4)
    assert no_hooks(t2t7)


def test_t2t_performer_epsilon_enters_as_in_the_layer(t2t7):
    """With ε a large share of the normalizer, rows no longer sum to 1 and must still give the layer's output."""
    layer = copy.deepcopy(t2t7.tokens_to_token.attention1)
    tokens = t2t_layer_inputs(t2t7, torch.randn(1, 3, 224, 160), [1])[1]
    T = tokens.shape[1]
    with torch.inference_mode():
        k, q, _ = layer.kqv(layer.norm1(tokens)).split(layer.token_dim, dim=-1)
        normalizer = layer._random_features(q) @ layer._random_features(k).sum(dim=1).unsqueeze(-1)  # (B, T, 1)
    layer.epsilon = float(normalizer.median())  # ε now halves the typical row sum
    matrix = attention_rows(layer, tokens, torch.arange(T))[:, 0]  # (B, T, T)
    y, v = _performer_output_and_values(layer, tokens)
    torch.testing.assert_close(matrix @ v, y, atol=1e-5, rtol=1e-4)
    row_sums = matrix.sum(dim=-1)
    assert 0.2 < float(row_sums.median()) < 0.8, row_sums.median()


def test_t2t_early_stop_at_restructurization_layer(t2t7):
    calls = []
    handles = [module.register_forward_hook(lambda *args, name=name: calls.append(name))
               for name, module in (('attention1', t2t7.tokens_to_token.attention1),
                                    ('soft_split1', t2t7.tokens_to_token.soft_split1),
                                    ('block0', t2t7.blocks[0]))]
    try:
        inputs = t2t_layer_inputs(t2t7, torch.randn(1, 3, 224, 160), [1])
    finally:
        for handle in handles:
            handle.remove()
    assert list(inputs) == [1] and inputs[1].shape == (1, 56 * 40, 147)
    assert calls == []


@pytest.mark.parametrize('name', ['t2t_vit_7', 'vit_tiny'])
def test_non_square_maps_match_reference(name, t2t7, cloned_outputs):
    torch.manual_seed(0)
    if name == 't2t_vit_7':
        model, x, grid = t2t7, torch.randn(2, 3, 224, 160), (14, 10)
    else:
        model = unfused(sharpen(timm.create_model('vit_tiny_patch16_224', dynamic_img_size=True).eval()))
        x, grid = torch.randn(2, 3, 64, 96), (4, 6)
    assert token_grid(model, *x.shape[-2:]) == grid
    reference = reference_matrices(cloned_outputs, model, x)
    heads = model.blocks[1].attn.num_heads

    maps = attention_maps(model, x, [1])[1]
    assert maps.grid == grid and maps.maps.shape == (2, heads, *grid)
    torch.testing.assert_close(maps.maps, reference[1][:, :, 0, 1:].reshape(2, heads, *grid), **TOLERANCE)

    row, col = grid[0] - 1, 1
    maps = attention_maps(model, x, [1], query=(row, col))[1]
    torch.testing.assert_close(
        maps.maps, reference[1][:, :, 1 + row * grid[1] + col, 1:].reshape(2, heads, *grid), **TOLERANCE)

    rollout = attention_rollout(model, x)  # through the last block, which T2T-ViT otherwise runs class-token only
    assert rollout.maps.shape == (2, 1, *grid)
    torch.testing.assert_close(rollout.maps.sum((1, 2, 3)) + rollout.prefix.sum((1, 2)), torch.ones(2))
    assert no_hooks(model)


def test_invalid_requests_are_refused(vit, images):
    with pytest.raises(IndexError):
        query_index((14, 14), (14, 0), 1)
    with pytest.raises(ValueError):
        query_index((14, 14), None, 0)
    with pytest.raises(IndexError):
        block_inputs(vit, images, [12])
    with pytest.raises(TypeError):
        attention_rows(nn.Linear(4, 4), torch.zeros(1, 3, 4), [0])
    with pytest.raises(ValueError):
        t2t_layer_inputs(timm.create_model('t2t_vit_7', img_size=64), torch.zeros(1, 3, 64, 64), [3])


def test_invalid_requests_say_what_is_wrong(vit, images):
    assert query_index((14, 10), (0, 0), 1) == 1 and query_index((14, 10), (13, 9), 2) == 2 + 13 * 10 + 9
    for outside in ((14, 0), (0, 10), (-1, 0), (0, -1)):
        with pytest.raises(IndexError, match=rf'^query \({outside[0]}, {outside[1]}\) is outside the 14x10 token grid$'):
            query_index((14, 10), outside, 1)
    with pytest.raises(ValueError, match=r'^these tokens have no class token; give a query position \(row, col\)$'):
        query_index((14, 14), None, 0)
    assert list(block_inputs(vit, images[:1], [-12, 11])) == [0, 11]  # -depth is the first block
    with pytest.raises(IndexError, match=r'^block -13 does not exist in a model of 12 blocks$'):
        block_inputs(vit, images, [-13])
    tokens = torch.zeros(1, 5, 192)
    assert attention_rows(vit.blocks[0], tokens, [0, 4]).shape == (1, 3, 2, 5)
    with pytest.raises(IndexError, match=r'^query indices must lie in \[0, 5\)$'):
        attention_rows(vit.blocks[0], tokens, [5])
    with pytest.raises(TypeError, match=r'^cannot recompute the attention of a Linear \(a timm ViT Block, '
                                        r'TokenTransformer or TokenPerformer is needed\)$'):
        attention_rows(nn.Linear(4, 4), torch.zeros(1, 3, 4), [0])
    with pytest.raises(TypeError, match=r'^ResNet is neither a T2T-ViT nor a timm ViT with a patch embedding$'):
        token_grid(timm.create_model('resnet18'), 224, 224)
    odd = nn.Module()
    odd.patch_embed = nn.Identity()  # a patch embedding without timm's grid arithmetic
    with pytest.raises(TypeError, match='neither a T2T-ViT nor'):
        token_grid(odd, 224, 224)
    with pytest.raises(TypeError, match=r'^VisionTransformer has no Tokens-to-Token module$'):
        t2t_attention_map(vit, images, 1, (0, 0))
    with pytest.raises(ValueError, match=r'^T2T restructurization layers are 1 and 2, not 3$'):
        t2t_layer_inputs(timm.create_model('t2t_vit_7', img_size=64), torch.zeros(1, 3, 64, 64), [3])
    with pytest.raises(ValueError, match=r'^first_block 5 comes after last_block 4$'):
        attention_rollout(vit, images[:1], 5, 4)
    single = attention_rollout(vit, images[:1], 3, 3)  # one block: its attention, mixed with the identity
    maps = attention_maps(vit, images[:1], [3])[3]
    torch.testing.assert_close(single.maps[:, 0], 0.5 * maps.mean, **TOLERANCE)  # the class token is off the grid
    torch.testing.assert_close(single.prefix[:, 0, 0], 0.5 * maps.prefix[:, :, 0].mean(1) + 0.5, **TOLERANCE)
    assert single.grid == (14, 14) and single.cpu().grid == (14, 14) and maps.cpu().grid == (14, 14)


def test_unusual_layers_and_grids_are_refused_with_what_is_wrong(vit, t2t7):
    from timm.models.vision_transformer import Attention

    class OwnAttention(Attention):
        def forward(self, x, attn_mask=None):
            return super().forward(x, attn_mask)

    block = copy.deepcopy(vit.blocks[0])
    block.attn = OwnAttention(192, num_heads=3)
    with pytest.raises(TypeError, match=r'^OwnAttention is not a timm Attention; its attention cannot be recomputed'):
        attention_rows(block, torch.zeros(1, 5, 192), [0])
    with pytest.raises(ValueError, match=r'^5 tokens do not fill the 14x10 grid$'):
        received_attention(vit.blocks[0], torch.zeros(1, 5, 192), (14, 10))

    class Skips(nn.Module):  # has blocks, never runs them
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

        def forward(self, x):
            return x

    with pytest.raises(RuntimeError, match=r'^the forward pass never ran \[0\]$'):
        block_inputs(Skips(), torch.zeros(1, 3, 4, 4), [0])
    tokens = t2t_layer_inputs(t2t7, torch.randn(1, 3, 224, 160), [1])[1]
    assert attention_rows(t2t7.tokens_to_token.attention1, tokens, [0, 1]).shape == (1, 1, 2, 56 * 40)  # one head


def test_rollout_bytes_default_to_the_whole_chain():
    model = zoo.build_on_meta('vit_tiny_patch16_224')
    assert rollout_bytes(model, 224) == rollout_bytes(model, 224, 0, -1) > rollout_bytes(model, 224, 1, -1)

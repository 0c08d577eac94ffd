"""Models with planted properties, shared by the tests that need them."""
import timm
import torch


def resnet18_with_dead_stem_channels(dead=(3, 7)) -> torch.nn.Module:
    """resnet18 (seed 0) whose stem channels ``dead`` are exactly zero after the ReLU on every image: the ReLU's
    input is negative there everywhere."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18').eval()
    with torch.no_grad():
        model.bn1.weight[list(dead)] = 0.0
        model.bn1.bias[list(dead)] = -1.0
    return model

import pytest
import torch

from rid_fast.train.models import build_model


@pytest.mark.parametrize(
    "spec,input_shape,features",
    [
        ({"name": "mlp", "hidden": [16, 8]}, (64,), {"blocks.0": (16,), "blocks.1": (8,)}),
        ({"name": "mlp", "hidden": [16], "batch_norm": False}, (40,), {"blocks.0": (16,)}),
        ({"name": "cnn", "channels": [4, 8], "image_shape": [1, 8, 8]}, (64,), {"blocks.1": (8, 8, 8)}),
        ({"name": "wrn", "depth": 10, "widen": 1}, (3, 32, 32), {"block1": (16, 32, 32), "block3": (64, 8, 8)}),
    ],
)
def test_shapes_and_named_layers(spec, input_shape, features):
    model = build_model(spec, input_shape, num_classes=10).eval()
    captured = {}
    modules = dict(model.named_modules())
    for name in features:
        modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.shape[1:]))
    assert model(torch.randn(2, *input_shape)).shape == (2, 10)
    assert {k: tuple(v) for k, v in captured.items()} == features


def test_bad_model_specs():
    with pytest.raises(ValueError, match="model name must be one of"):
        build_model({"name": "vit"}, (64,), 10)
    with pytest.raises(ValueError, match="bad options for model 'mlp'"):
        build_model({"name": "mlp", "width": 3}, (64,), 10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        build_model({"name": "wrn", "depth": 12}, (3, 32, 32), 10)

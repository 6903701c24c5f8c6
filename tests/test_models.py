import pytest
import torch

from lrbs.errors import ConfigError, ShapeError
from lrbs.models import build_model, count_parameters, list_models


@pytest.mark.parametrize(
    "name,kw,shape",
    [
        ("mlp", {}, (40,)),
        ("mlp", {"batchnorm": True, "activation": "tanh"}, (40,)),
        ("cnn1d", {}, (40,)),
        ("resnet1d", {"depth": 8, "width": 8}, (40,)),
        ("resnet1d", {"depth": 8, "width": 8, "skip": False}, (40,)),
        ("convnet", {"width": 8}, (3, 32, 32)),
        ("resnet", {"depth": 4, "width": 8}, (3, 32, 32)),
    ],
)
def test_models_run(name, kw, shape):
    m = build_model(name, input_shape=shape, num_classes=10, **kw)
    out = m(torch.randn(5, *shape))
    assert out.shape == (5, 10)


def test_cnn1d_matches_the_mnist1d_paper_size(mnist1d):
    m = build_model("cnn1d", dataset=mnist1d)
    assert count_parameters(m) == 5210  # conv 150 + 1900 + 1900, linear 125*10+10


def test_seeded_init_is_reproducible_and_leaves_global_rng():
    state = torch.get_rng_state()
    a = build_model("mlp", input_shape=(4,), num_classes=2, seed=3)
    b = build_model("mlp", input_shape=(4,), num_classes=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_skip_flag_changes_forward_not_parameters():
    a = build_model("resnet1d", input_shape=(40,), num_classes=3, depth=6, width=4, seed=0)
    b = build_model("resnet1d", input_shape=(40,), num_classes=3, depth=6, width=4, seed=0, skip=False)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    x = torch.randn(2, 40)
    a.eval()
    b.eval()
    assert not torch.allclose(a(x), b(x))


def test_wrong_input_shape_names_both():
    m = build_model("mlp", input_shape=(40,), num_classes=10)
    with pytest.raises(ShapeError, match=r"input has shape \(3, 41\) but the model expects \(batch, 40\)"):
        m(torch.randn(3, 41))


def test_bad_model_arguments():
    with pytest.raises(ConfigError, match=r"unknown model 'cnn'.*Did you mean 'cnn1d'"):
        build_model("cnn", input_shape=(40,), num_classes=10)
    with pytest.raises(ConfigError, match="must be even"):
        build_model("resnet1d", input_shape=(40,), num_classes=10, depth=7)
    with pytest.raises(ConfigError, match="activation='relux'"):
        build_model("mlp", input_shape=(40,), num_classes=10, activation="relux")
    with pytest.raises(ConfigError, match="needs dataset= or both"):
        build_model("mlp")
    with pytest.raises(ConfigError, match="unknown option"):
        build_model("mlp", input_shape=(4,), num_classes=2, widht=3)
    assert set(list_models()) >= {"mlp", "cnn1d", "resnet1d", "convnet", "resnet"}

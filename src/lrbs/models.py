"""Model zoo: small networks for MNIST-1D and CIFAR-10 shapes, behind one registry.

- ``mlp``: depth x width fully connected net (the MNIST-1D paper's MLP is ``depth=3, width=100``).
- ``cnn1d``: the MNIST-1D paper's ConvBase (three stride-2 conv layers of 25 channels + a linear head, 5,210
  parameters; Greydanus 2020).
- ``resnet1d``: a 1-D ResNet whose ``depth`` counts conv layers, with ``skip=False`` for the plain net of the same
  shape (Li et al. 2018 compare exactly these two).
- ``convnet`` / ``resnet``: small image models for CIFAR-10 shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ShapeError, check_choice, check_int, unknown_name

__all__ = ["build_model", "list_models", "count_parameters"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "sigmoid": nn.Sigmoid}


class _Checked(nn.Module):
    """A module that checks the shape of its input before running ``body``."""

    def __init__(self, input_shape: tuple[int, ...], body: nn.Module):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"input has shape {tuple(x.shape)} but the model expects (batch, "
                f"{', '.join(map(str, self.input_shape))})"
            )
        return self.body(x)


def _act(name: str) -> nn.Module:
    check_choice("activation", name, _ACTIVATIONS)
    return _ACTIVATIONS[name]()


def _mlp(
    input_shape,
    num_classes,
    depth: int = 3,
    width: int = 100,
    activation: str = "relu",
    batchnorm: bool = False,
) -> nn.Module:
    depth = check_int("depth", depth, low=1)
    width = check_int("width", width, low=1)
    d_in = 1
    for s in input_shape:
        d_in *= s
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth - 1):
        layers.append(nn.Linear(d_in if i == 0 else width, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(_act(activation))
    layers.append(nn.Linear(d_in if depth == 1 else width, num_classes))
    return nn.Sequential(*layers)


class _ConvBase(nn.Module):
    def __init__(self, length: int, num_classes: int, channels: int = 25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        n = length
        for k in (5, 3, 3):
            n = (n + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * n, num_classes)

    def forward(self, x):
        x = x.view(x.shape[0], 1, -1)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.linear(x.flatten(1))


def _cnn1d(input_shape, num_classes, channels: int = 25) -> nn.Module:
    if len(input_shape) != 1:
        raise ConfigError(f"cnn1d needs 1-D inputs, got input_shape={input_shape}")
    return _ConvBase(input_shape[0], num_classes, check_int("channels", channels, low=1))


class _Block(nn.Module):
    """Two conv layers with an optional identity shortcut (He et al. 2016)."""

    def __init__(self, conv: Callable, norm: Callable, width: int, skip: bool, batchnorm: bool):
        super().__init__()
        self.c1, self.c2 = conv(width, width), conv(width, width)
        self.n1 = norm(width) if batchnorm else nn.Identity()
        self.n2 = norm(width) if batchnorm else nn.Identity()
        self.skip = skip

    def forward(self, x):
        out = torch.relu(self.n1(self.c1(x)))
        out = self.n2(self.c2(out))
        return torch.relu(out + x if self.skip else out)


class _ResNet(nn.Module):
    def __init__(
        self, dims: int, in_ch: int, num_classes: int, depth: int, width: int, skip: bool, batchnorm: bool
    ):
        super().__init__()
        conv_t = nn.Conv1d if dims == 1 else nn.Conv2d
        norm_t = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.dims = dims

        def conv(i, o):
            return conv_t(i, o, 3, padding=1, bias=not batchnorm)

        self.stem = conv(in_ch, width)
        self.stem_norm = norm_t(width) if batchnorm else nn.Identity()
        self.blocks = nn.Sequential(
            *[_Block(conv, norm_t, width, skip, batchnorm) for _ in range((depth - 2) // 2)]
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        if self.dims == 1 and x.dim() == 2:
            x = x.unsqueeze(1)
        x = torch.relu(self.stem_norm(self.stem(x)))
        x = self.blocks(x)
        return self.head(x.flatten(2).mean(-1))


def _resnet1d(
    input_shape, num_classes, depth: int = 20, width: int = 16, skip: bool = True, batchnorm: bool = True
) -> nn.Module:
    depth = check_int("depth", depth, low=2)
    if depth % 2:
        raise ConfigError(
            f"depth={depth} is not allowed for resnet1d: must be even (stem + 2 per block + head)"
        )
    in_ch = 1 if len(input_shape) == 1 else input_shape[0]
    return _ResNet(
        1, in_ch, num_classes, depth, check_int("width", width, low=1), bool(skip), bool(batchnorm)
    )


def _resnet(
    input_shape, num_classes, depth: int = 8, width: int = 16, skip: bool = True, batchnorm: bool = True
) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(f"resnet needs image inputs (C, H, W), got input_shape={input_shape}")
    depth = check_int("depth", depth, low=2)
    if depth % 2:
        raise ConfigError(f"depth={depth} is not allowed for resnet: must be even")
    return _ResNet(
        2, input_shape[0], num_classes, depth, check_int("width", width, low=1), bool(skip), bool(batchnorm)
    )


def _convnet(input_shape, num_classes, width: int = 32, batchnorm: bool = False) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(f"convnet needs image inputs (C, H, W), got input_shape={input_shape}")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    ch = c
    for mult in (1, 2):
        layers += [nn.Conv2d(ch, width * mult, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(width * mult))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        ch = width * mult
    layers += [nn.Flatten(), nn.Linear(ch * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "cnn1d": _cnn1d,
    "resnet1d": _resnet1d,
    "convnet": _convnet,
    "resnet": _resnet,
}


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(
    name: str,
    *,
    dataset: Any = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    seed: int | None = 0,
    **kw: Any,
) -> nn.Module:
    """Build a model from the zoo.

    Args:
        name: one of :func:`list_models`.
        dataset: an lrbs ``Dataset``; its ``input_shape`` and ``num_classes`` are used when not given.
        input_shape: shape of one input sample, e.g. ``(40,)``.
        num_classes: number of outputs.
        seed: seeds the initialization (in a forked RNG, so the caller's random state is untouched);
            ``None`` draws from the global RNG.
        **kw: the model's options (``depth``, ``width``, ``skip``, ``batchnorm``, ``activation``, ...).

    Returns:
        The model. Its forward checks the input shape and names the expected and actual shape on a mismatch.

    Raises:
        ConfigError: unknown name (suggests the closest) or bad options.
    """
    if name not in _REGISTRY:
        raise unknown_name("model", name, _REGISTRY)
    if dataset is not None:
        input_shape = input_shape or tuple(dataset.input_shape)
        num_classes = num_classes or dataset.num_classes
    if input_shape is None or num_classes is None:
        raise ConfigError("build_model needs dataset= or both input_shape= and num_classes=")
    input_shape = tuple(int(s) for s in input_shape)
    num_classes = check_int("num_classes", num_classes, low=1)

    def make() -> nn.Module:
        try:
            return _REGISTRY[name](input_shape, num_classes, **kw)
        except TypeError as e:
            if "unexpected keyword" in str(e):
                raise ConfigError(f"model {name!r} got an unknown option: {e}") from None
            raise

    if seed is None:
        body = make()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            body = make()
    model = _Checked(input_shape, body)
    model.lrbs_spec = {
        "name": name,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "seed": seed,
        **kw,
    }
    return model

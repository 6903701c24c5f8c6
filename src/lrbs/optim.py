"""Large-batch and sharpness-aware optimizers: SAM / ASAM, LARS, LAMB, and a registry by name.

All three are plain ``torch.optim.Optimizer`` subclasses: they take param groups, work with any torch
``LRScheduler`` (which sets ``lr`` on ``param_groups``) and round-trip through ``state_dict()`` /
``load_state_dict()``. ``get_optimizer(name, params, lr=...)`` builds any of them, or torch's SGD / Adam /
AdamW, by name; ``fit()`` uses it.

References:
    Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for Efficiently Improving
    Generalization. ICLR 2021 (arXiv 2010.01412).
    Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
    Deep Neural Networks. ICML 2021 (arXiv 2102.11600).
    You, Gitman, Ginsburg. Large Batch Training of Convolutional Networks. 2017 (arXiv 1708.03888).
    You et al. Large Batch Optimization for Deep Learning: Training BERT in 76 minutes. ICLR 2020
    (arXiv 1904.00962).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lrbs.errors import (
    ConfigError,
    LrbsError,
    LrbsTypeError,
    check_choice,
    check_number,
    check_positive,
    unknown_name,
)
from lrbs.step import disable_running_stats, enable_running_stats, frozen_running_stats

__all__ = [
    "LAMB",
    "LARS",
    "SAM",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_running_stats",
    "get_optimizer",
    "list_optimizers",
    "sam_step",
]

_SAM_EPS = 1e-12  # added to the perturbation's denominator, as in davda54/sam


def _check_lr(lr: Any) -> float:
    return check_positive("lr", lr)


def _check_weight_decay(weight_decay: Any) -> float:
    return check_number("weight_decay", weight_decay, low=0.0, low_inclusive=True)


def _check_momentum(momentum: Any) -> float:
    return check_number("momentum", momentum, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)


def _check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"betas={betas!r} is not allowed: must be a pair (beta1, beta2), each in [0, 1)")
    b1, b2 = (
        check_number(f"betas[{i}]", b, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
        for i, b in enumerate(betas)
    )
    return (b1, b2)


# --------------------------------------------------------------------------------------------------
# SAM / ASAM
# --------------------------------------------------------------------------------------------------


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization (SAM) and its adaptive variant (ASAM) around any base optimizer.

    SAM minimises :math:`\max_{\|\epsilon\|_2 \le \rho} L(w + \epsilon)` with one ascent step. With
    :math:`g = \nabla L(w)` it perturbs the weights to :math:`w + \hat\epsilon`, takes the gradient there,
    restores :math:`w` and lets the base optimizer step with that gradient:

    .. math::

        \hat\epsilon = \rho \, \frac{g}{\|g\|_2 + 10^{-12}}                       \quad\text{(SAM)}

        \hat\epsilon = \rho \, \frac{w^2 \odot g}{\|\,|w| \odot g\,\|_2 + 10^{-12}} \quad\text{(ASAM)}

    The norm runs over all parameters of all groups (one global perturbation). ASAM's normalisation
    operator is :math:`T_w = |w|`; like davda54/sam we omit the paper's small :math:`\eta` added to
    :math:`|w|`, so a parameter that is exactly 0 is not perturbed. Typical ``rho``: 0.05 for SAM, 2.0 for
    ASAM (about 10x larger, as the davda54/sam README suggests).

    The base optimizer shares SAM's ``param_groups`` (the same dicts), so an LR scheduler that sets
    ``lr`` on SAM's groups drives the base optimizer. ``state_dict()`` is the base optimizer's (it holds
    e.g. momentum buffers); SAM itself keeps nothing between steps but the weights saved by
    :meth:`first_step`.

    **BatchNorm:** the second forward pass (at :math:`w + \hat\epsilon`) must not update running
    statistics. Use :func:`sam_step`, ``step(closure, model=model)``, or wrap the second pass in
    :func:`frozen_running_stats`.

    Args:
        params: parameters or param groups (groups may set their own ``rho`` / ``adaptive``).
        base_optimizer: an optimizer *class*, e.g. ``torch.optim.SGD``; it is built on SAM's groups.
        rho: neighbourhood radius, > 0.
        adaptive: use ASAM's scale-invariant perturbation.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    Raises:
        LrbsTypeError: ``base_optimizer`` is not a subclass of ``torch.optim.Optimizer``, or ``adaptive``
            is not a bool.
        ConfigError: ``rho`` is not a finite number > 0, or ``lr`` (if given) is not > 0.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss = sam_step(model, torch.nn.functional.mse_loss, x, y, opt)
        >>> bool(loss > 0)
        True

    References:
        Foret et al. 2021 (arXiv 2010.01412); Kwon et al. 2021 (arXiv 2102.11600); code: davda54/sam.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not (inspect.isclass(base_optimizer) and issubclass(base_optimizer, torch.optim.Optimizer)):
            got = (
                repr(base_optimizer)
                if inspect.isclass(base_optimizer) or isinstance(base_optimizer, str)
                else (f"<{type(base_optimizer).__name__} instance>")
            )
            raise LrbsTypeError(
                f"base_optimizer={got} is not allowed: must be an optimizer class "
                "(a subclass of torch.optim.Optimizer, e.g. torch.optim.SGD), not an instance or a name"
            )
        if issubclass(base_optimizer, SAM):
            raise LrbsTypeError(f"base_optimizer={base_optimizer!r} is not allowed: SAM cannot wrap SAM")
        rho = check_positive("rho", rho)
        if not isinstance(adaptive, bool):
            raise LrbsTypeError(f"adaptive={adaptive!r} is not allowed: must be True or False")
        if "lr" in base_kwargs:
            base_kwargs["lr"] = _check_lr(base_kwargs["lr"])
        if "weight_decay" in base_kwargs:
            base_kwargs["weight_decay"] = _check_weight_decay(base_kwargs["weight_decay"])
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        norms = [
            ((p.abs() * p.grad) if group["adaptive"] else p.grad).norm(2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move the weights to ``w + e`` (the ascent step) using the gradients now in ``.grad``.

        Args:
            zero_grad: zero the gradients afterwards, ready for the second backward pass.

        Raises:
            LrbsError: the weights are already perturbed (``first_step`` twice without ``second_step``).
        """
        if any("old_p" in st for st in self.state.values()):
            raise LrbsError(
                "SAM.first_step() was called twice without second_step() in between: the weights are "
                "already at w + e; call second_step() to restore them and update"
            )
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _SAM_EPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e_w = p.grad * scale.to(p)
                if group["adaptive"]:
                    e_w = e_w * p.square()
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and let the base optimizer step with the gradient taken at ``w + e``.

        Args:
            zero_grad: zero the gradients afterwards.

        Raises:
            LrbsError: :meth:`first_step` was not called before.
        """
        self.restore_weights()
        self.base_optimizer.step()
        # An LRScheduler attached to SAM only sees calls to SAM.step(); record that an update happened
        # so that it does not warn about "lr_scheduler.step() before optimizer.step()".
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Put back the weights ``w`` saved by :meth:`first_step`, without a base step.

        :meth:`second_step` is ``restore_weights()`` then the base optimizer's step; a caller that decides to skip
        the update (a GradScaler that found non-finite gradients in the second pass) restores only.

        Raises:
            LrbsError: :meth:`first_step` was not called before.
        """
        restored = 0
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None) if p in self.state else None
                if old is not None:
                    p.copy_(old)
                    restored += 1
        if restored == 0:
            raise LrbsError(
                "SAM.second_step() was called without a first_step() before it: call first_step() after the "
                "first backward pass, or use step(closure) / sam_step(...)"
            )

    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *, model: nn.Module | None = None
    ) -> Tensor:
        """Do both passes: gradient at ``w``, ascent, gradient at ``w + e``, restore, base step.

        The gradients are zeroed first, then ``closure`` (which must compute the loss, call
        ``backward()`` and return the loss) runs twice.

        Args:
            closure: recomputes the loss and its gradient at the current weights.
            model: when given, its BatchNorm running statistics are left untouched by the second pass.

        Returns:
            The loss at ``w`` (the first call of ``closure``).

        Raises:
            ConfigError: ``closure`` is None.
        """
        if closure is None:
            raise ConfigError(
                "closure=None is not allowed: SAM.step needs a closure that computes the loss, calls "
                "backward() and returns the loss (or use first_step()/second_step() or sam_step())"
            )
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        frozen = frozen_running_stats(model) if model is not None else contextlib.nullcontext()
        with frozen, torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; its param groups also carry ``rho`` and ``adaptive``."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` and re-share the param groups with the base optimizer."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def sam_step(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    opt: SAM,
) -> Tensor:
    """One SAM / ASAM update on the batch ``(x, y)``, with BatchNorm statistics updated only once.

    First pass at ``w`` (BN running statistics updated as usual), :meth:`SAM.first_step`, second pass at
    ``w + e`` inside :func:`frozen_running_stats`, then :meth:`SAM.second_step`.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(model(x), y)`` gives a scalar loss.
        x: inputs.
        y: targets.
        opt: a :class:`SAM` optimizer over the model's parameters.

    Returns:
        The (detached) loss at ``w``, before the update.

    Raises:
        LrbsTypeError: ``opt`` is not a :class:`SAM`.
    """
    if not isinstance(opt, SAM):
        raise LrbsTypeError(f"opt={type(opt).__name__} is not allowed: sam_step needs a lrbs.optim.SAM")
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    with frozen_running_stats(model):
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss.detach()


# --------------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    r"""Layer-wise Adaptive Rate Scaling (LARS) with heavy-ball momentum.

    For each parameter tensor :math:`w` with gradient :math:`g` (weight decay :math:`\lambda_{wd}`):

    .. math::

        \lambda = \frac{\text{trust} \cdot \|w\|}{\|g\| + \lambda_{wd}\|w\| + \text{eps}}
        \quad(\lambda = 1 \text{ if } \|w\| = 0 \text{ or } \|g\| = 0),

        \tilde g = \lambda\,(g + \lambda_{wd} w), \qquad
        b \leftarrow \mu b + \tilde g \;(b = \tilde g \text{ at the first step}), \qquad
        w \leftarrow w - \text{lr}\cdot b.

    This follows timm's ``timm/optim/lars.py`` (defaults ``trust_coefficient=0.001``, ``eps=1e-8``, no
    dampening, no LARC clipping), with two differences: the trust ratio is always applied (timm adapts only
    when ``weight_decay != 0`` unless ``always_adapt=True``), and 1-D tensors (biases, BatchNorm/LayerNorm
    weights) are excluded here from both adaptation and weight decay when ``exclude_1d=True`` — they take
    a plain momentum-SGD step — where timm leaves that to param groups. torch-optimizer uses trust 0.01 and
    apex LARC 0.02. ``p.grad`` is not modified.

    Args:
        params: parameters or param groups.
        lr: learning rate, > 0.
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: L2 coefficient (added to the gradient before the trust ratio), >= 0.
        trust_coefficient: the trust coefficient, > 0.
        eps: added to the trust ratio's denominator, >= 0.
        exclude_1d: exclude tensors with ``ndim <= 1`` from adaptation and weight decay.

    Raises:
        ConfigError: an argument is out of range (``lr <= 0``, ``weight_decay < 0``, ...).

    References:
        You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks" (arXiv 1708.03888).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(
            lr=_check_lr(lr),
            momentum=_check_momentum(momentum),
            weight_decay=_check_weight_decay(weight_decay),
            trust_coefficient=check_positive("trust_coefficient", trust_coefficient),
            eps=check_number("eps", eps, low=0.0, low_inclusive=True),
            exclude_1d=bool(exclude_1d),
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Perform one LARS update; ``closure`` (optional) recomputes the loss and its gradient (returned, else None)."""
        loss = _run_closure(closure)
        for group in self.param_groups:
            wd, mu = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not (group["exclude_1d"] and p.ndim <= 1):
                    w_norm, g_norm = p.norm(2), g.norm(2)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    g = (g + wd * p) * ratio
                if mu != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(mu).add_(g)
                    g = state["momentum_buffer"]
                p.add_(g, alpha=-group["lr"])
        return loss


# --------------------------------------------------------------------------------------------------
# LAMB
# --------------------------------------------------------------------------------------------------


class LAMB(torch.optim.Optimizer):
    r"""Layer-wise Adaptive Moments for Batch training (LAMB).

    With step :math:`t`, gradient :math:`g` and weight decay :math:`\lambda_{wd}`, per parameter tensor:

    .. math::

        m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,

        \hat m = m/(1-\beta_1^t), \quad \hat v = v/(1-\beta_2^t)
        \quad(\hat m = m,\ \hat v = v \text{ if } \texttt{bias\_correction=False}),

        u = \frac{\hat m}{\sqrt{\hat v} + \text{eps}} + \lambda_{wd} w, \qquad
        r = \frac{\min(\|w\|, \text{clamp})}{\|u\|} \quad(r = 1 \text{ if either norm is } 0), \qquad
        w \leftarrow w - \text{lr}\cdot r \cdot u.

    The paper's Algorithm 2 debiases the moments (``bias_correction=True``, the default, as in NVIDIA's
    and the paper's reference code). torch-optimizer's ``Lamb`` does not by default (``debias=False``,
    "paper v3 does not use debiasing"); ``bias_correction=False`` matches it exactly (with its defaults
    ``eps=1e-6``, ``clamp_value=10``). Its ``debias=True`` is *not* the same as ours: it rescales the step
    size by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` outside the trust ratio. Unlike LARS, every tensor
    (1-D included) is adapted; put biases in a param group with ``weight_decay=0`` to exclude them from
    decay.

    Args:
        params: parameters or param groups.
        lr: learning rate, > 0.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: added to :math:`\sqrt{\hat v}`, > 0.
        weight_decay: decoupled weight decay inside the trust ratio, >= 0.
        bias_correction: debias the moments (paper); False matches torch-optimizer.
        clamp_value: upper clamp of :math:`\|w\|` in the trust ratio, > 0.

    Raises:
        ConfigError: an argument is out of range.

    References:
        You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
        (arXiv 1904.00962).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        clamp_value: float = 10.0,
    ) -> None:
        defaults = dict(
            lr=_check_lr(lr),
            betas=_check_betas(betas),
            eps=check_positive("eps", eps),
            weight_decay=_check_weight_decay(weight_decay),
            bias_correction=bool(bias_correction),
            clamp_value=check_positive("clamp_value", clamp_value),
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Perform one LAMB update; ``closure`` (optional) recomputes the loss and its gradient (returned, else None)."""
        loss = _run_closure(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if group["bias_correction"]:
                    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
                else:
                    m_hat, v_hat = m, v
                u = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"] != 0:
                    u = u + group["weight_decay"] * p
                w_norm = p.norm(2).clamp(0, group["clamp_value"])
                u_norm = u.norm(2)
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(u * ratio, alpha=-group["lr"])
        return loss


def _run_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The loss of ``closure()`` under ``torch.enable_grad()`` (optimizer steps run under no_grad), else None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_OPTIMIZERS = ("adam", "adamw", "asam", "lamb", "lars", "sam", "sgd")
_SAM_BASES = ("sgd", "adam")
_DEFAULT_RHO = {"sam": 0.05, "asam": 2.0}


def list_optimizers() -> list[str]:
    """The names :func:`get_optimizer` accepts, sorted."""
    return list(_OPTIMIZERS)


def _check_applies(
    key: str, name: str, rho: float | None, betas: Any, base: str | None, momentum: float
) -> tuple[str, tuple[float, float]]:
    """Reject ``rho`` / ``base`` / ``betas`` where they do not apply to optimizer ``key``; the base and betas used."""
    is_sam = key in ("sam", "asam")
    if rho is not None and not is_sam:
        raise ConfigError(f"rho={rho!r} is not allowed for optimizer {name!r}: rho only applies to sam/asam")
    if base is not None and not is_sam:
        raise ConfigError(
            f"base={base!r} is not allowed for optimizer {name!r}: base only applies to sam/asam"
        )
    base = check_choice("base", base, _SAM_BASES) if base is not None else "sgd"
    uses_betas = key in ("adam", "adamw", "lamb") or (is_sam and base == "adam")
    if betas is not None and not uses_betas:
        raise ConfigError(
            f"betas={betas!r} is not allowed for optimizer {name!r}"
            f"{' with base=' + repr(base) if is_sam else ''}: betas only apply to adam, adamw, lamb "
            "and sam/asam with base='adam' (use momentum)"
        )
    betas = _check_betas(betas) if betas is not None else (momentum, 0.999)
    return base, betas


def get_optimizer(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    rho: float | None = None,
    betas: tuple[float, float] | None = None,
    base: str | None = None,
) -> torch.optim.Optimizer:
    r"""Build an optimizer by name, mapping the common hyperparameters onto each one.

    ========  ==========================================================================================
    name      what is built
    ========  ==========================================================================================
    sgd       ``torch.optim.SGD(lr, momentum, weight_decay)``
    adam      ``torch.optim.Adam(lr, betas, weight_decay)`` (L2 weight decay)
    adamw     ``torch.optim.AdamW(lr, betas, weight_decay)`` (decoupled weight decay)
    sam       ``SAM(base, rho=0.05)``; base SGD(lr, momentum, weight_decay) or, ``base="adam"``, Adam
    asam      as ``sam`` with ``adaptive=True`` and ``rho=2.0``
    lars      ``LARS(lr, momentum, weight_decay)`` (trust 0.001, 1-D tensors excluded)
    lamb      ``LAMB(lr, betas, weight_decay)`` (bias-corrected)
    ========  ==========================================================================================

    For the Adam family and LAMB, ``betas=None`` means ``(momentum, 0.999)``, so a momentum schedule
    drives :math:`\beta_1` (as fast.ai's one-cycle does); explicit ``betas`` take precedence. ``rho`` only
    applies to ``sam``/``asam``, ``betas`` only to the Adam family, LAMB and SAM on Adam, ``base`` only to
    ``sam``/``asam``: giving one where it does not apply is an error rather than silently ignored.

    Args:
        name: one of :func:`list_optimizers` (case-insensitive).
        params: parameters, param groups, or a module (its ``parameters()``).
        lr: learning rate, > 0.
        momentum: SGD/LARS momentum, or Adam/LAMB :math:`\beta_1` when ``betas`` is None; in [0, 1).
        weight_decay: >= 0.
        rho: SAM radius, > 0; None for the default (0.05 SAM, 2.0 ASAM).
        betas: Adam/LAMB betas, each in [0, 1).
        base: SAM's base optimizer, ``"sgd"`` (default) or ``"adam"``.

    Returns:
        The optimizer.

    Raises:
        ConfigError: unknown name (the closest known name is suggested), an out-of-range value, or an
            argument that does not apply to ``name``.
        LrbsTypeError: ``name`` is not a string.

    Example:
        >>> opt = get_optimizer("lamb", torch.nn.Linear(2, 2), lr=1e-3, weight_decay=0.01)
        >>> type(opt).__name__, opt.param_groups[0]["betas"]
        ('LAMB', (0.9, 0.999))
    """
    if not isinstance(name, str):
        raise LrbsTypeError(f"name={name!r} is not allowed: must be a string, one of {list(_OPTIMIZERS)}")
    key = name.lower()
    if key not in _OPTIMIZERS:
        raise unknown_name("optimizer", name, _OPTIMIZERS)
    lr = _check_lr(lr)
    momentum = _check_momentum(momentum)
    weight_decay = _check_weight_decay(weight_decay)
    base, betas = _check_applies(key, name, rho, betas, base, momentum)
    return _build(key, params, lr, momentum, weight_decay, rho, betas, base)


def _build(
    key: str,
    params: Any,
    lr: float,
    momentum: float,
    weight_decay: float,
    rho: float | None,
    betas: Any,
    base: str,
) -> torch.optim.Optimizer:
    """Construct the checked optimizer ``key`` (see :func:`get_optimizer`'s table)."""
    if isinstance(params, nn.Module):
        params = params.parameters()

    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if key == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "lamb":
        return LAMB(params, lr=lr, betas=betas, weight_decay=weight_decay)
    rho = _DEFAULT_RHO[key] if rho is None else rho
    if base == "adam":
        base_cls, base_kwargs = torch.optim.Adam, dict(betas=betas)
    else:
        base_cls, base_kwargs = torch.optim.SGD, dict(momentum=momentum)
    return SAM(
        params, base_cls, rho=rho, adaptive=key == "asam", lr=lr, weight_decay=weight_decay, **base_kwargs
    )

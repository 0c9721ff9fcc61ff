"""Gradient estimators for the logits of a factorised categorical architecture distribution.

The distribution is a list of independent categoricals, one logits tensor of shape (C_i,) per
choice. Each estimator draws one sample per example for a batch of B examples and calls the
caller's ``loss_fn`` on it. It returns a scalar surrogate whose ``backward()`` writes an estimate
of d/dphi E_z[mean over the batch of the loss] into the graph leaves behind the logits.

Estimators, chosen by name with ``create_estimator``:

- ``reinforce``: score function with an exponential-moving-average baseline. Unbiased.
- ``relaxed``: Gumbel-softmax reparameterisation, as in SNAS and GDAS. Biased.
- ``rebar``: REBAR with eta = 1 (Tucker et al., 2017). Unbiased.
- ``relax``: RELAX with a learned control variate (Grathwohl et al., 2018). Unbiased.

``RelaxEstimator`` has one extra method, ``step_control_variate()``, which trains the control
variate network. A training step with it reads::

    result = estimator.estimate(logits, loss_fn, batch_size, generator)
    result.surrogate.backward()
    estimator.step_control_variate()
    architecture_optimizer.step()

``surrogate.backward()`` can also write gradients into any parameter that ``loss_fn`` uses
(the network weights) because the relaxed terms of the surrogate are differentiable in them.
Callers that train weights on ``weight_sample`` should zero or recompute those gradients.
"""

import copy
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LossFn = Callable[[list[Tensor]], Tensor]

__all__ = [
    "EstimateResult",
    "GradientEstimator",
    "LossFn",
    "RebarEstimator",
    "RelaxEstimator",
    "RelaxedEstimator",
    "ReinforceEstimator",
    "create_estimator",
    "estimator_names",
    "gumbel_softmax_sample",
    "register_estimator",
    "sample_gumbel",
]


@dataclass(frozen=True)
class EstimateResult:
    """Output of one ``GradientEstimator.estimate`` call.

    Attributes:
        surrogate: Scalar whose ``backward()`` writes the gradient estimate into the logits' leaves.
        loss: Detached per-example losses, shape (B,), of the sample whose loss is the objective
            (the discrete sample, except for ``relaxed``, where it is the relaxed sample).
        weight_sample: Detached (B, C_i) tensors on which the network weights are trained: the
            relaxed sample for relaxed, rebar and relax, and the one-hot sample for reinforce.
        discrete_sample: Detached one-hot (B, C_i) tensors.
    """

    surrogate: Tensor
    loss: Tensor
    weight_sample: list[Tensor]
    discrete_sample: list[Tensor]


class GradientEstimator(ABC):
    """Base class of the architecture gradient estimators."""

    @abstractmethod
    def estimate(
        self,
        logits: Sequence[Tensor],
        loss_fn: LossFn,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> EstimateResult:
        """Sample a batch, evaluate ``loss_fn`` and build the surrogate of the gradient estimate."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state that ``load_state_dict`` needs to restore this estimator exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state returned by ``state_dict``."""


EstimatorT = TypeVar("EstimatorT", bound=type[GradientEstimator])

_ESTIMATORS: dict[str, type[GradientEstimator]] = {}


def register_estimator(name: str) -> Callable[[EstimatorT], EstimatorT]:
    """Register a ``GradientEstimator`` subclass as ``name``. Raises ValueError on a duplicate."""

    def register(estimator_class: EstimatorT) -> EstimatorT:
        if name in _ESTIMATORS:
            raise ValueError(f"estimator {name!r} is already registered")
        _ESTIMATORS[name] = estimator_class
        return estimator_class

    return register


def estimator_names() -> list[str]:
    """Return the registered estimator names, sorted."""
    return sorted(_ESTIMATORS)


def create_estimator(name: str, **kwargs: Any) -> GradientEstimator:
    """Construct the estimator registered as ``name``. Raises ValueError for an unknown name."""
    if name not in _ESTIMATORS:
        raise ValueError(
            f"unknown estimator {name!r}; valid names: {', '.join(estimator_names())}"
        )
    return _ESTIMATORS[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# Sampling helpers


def sample_gumbel(
    shape: tuple[int, ...],
    like: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Draw standard Gumbel noise of ``shape`` on the device and dtype of ``like``."""
    uniform = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    # torch.rand can return exactly 0, and 1 - eps keeps -log(u) positive after rounding.
    info = torch.finfo(like.dtype)
    uniform = uniform.clamp(min=info.tiny, max=1.0 - info.eps)
    return -torch.log(-torch.log(uniform))


def gumbel_softmax_sample(
    logits: Sequence[Tensor],
    batch_size: int,
    tau: float,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Draw a relaxed sample softmax((logits + g) / tau), shape (batch_size, C_i) per choice.

    The result is differentiable in ``logits``.
    """
    _check_logits(logits)
    _check_batch_size(batch_size)
    _check_tau(tau)
    relaxed = []
    for choice_logits in logits:
        gumbel = sample_gumbel((batch_size, choice_logits.shape[0]), choice_logits, generator)
        relaxed.append(torch.softmax((choice_logits + gumbel) / tau, dim=-1))
    return relaxed


def _one_hot_argmax(scores: Tensor) -> Tensor:
    return F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)


def _log_prob(normalized_logits: Sequence[Tensor], one_hot: Sequence[Tensor]) -> Tensor:
    """Return log q(b) per example, shape (B,), summed over the independent choices."""
    per_choice = [(theta * b).sum(dim=-1) for theta, b in zip(normalized_logits, one_hot)]
    return torch.stack(per_choice).sum(dim=0)


def _conditional_gumbel(perturbed: Tensor, normalized_logits: Tensor, one_hot: Tensor) -> Tensor:
    """Return z~, the Gumbel sample conditioned on b = argmax z, rebuilt from the noise in z.

    The standard construction draws fresh uniforms v and sets z~_b = -log(-log v_b) and
    z~_k = -log(-log(v_k) / exp(theta_k) - log v_b) for k != b. For Gumbel-max the map from the
    noise to (b, v) is a bijection, so v is recovered from ``perturbed`` (z = theta + g) instead:
    -log v_b = exp(-z_b) and -log v_k = exp(theta_k) * (exp(-z_k) - exp(-z_b)). With v held fixed,
    z~ equals z in value, but its gradient with respect to theta is the conditional one.
    The formulas need normalised logits, where log-sum-exp(theta) = 0.
    """
    z = perturbed.detach()
    theta = normalized_logits.detach()
    is_chosen = one_hot.bool()
    z_max = (z * one_hot).sum(dim=-1, keepdim=True)

    # log(-log v_k), kept in log space so that very likely or very unlikely classes stay finite.
    # For the chosen class the expression is log(0), so it is replaced by 0 and masked below.
    gap = torch.where(is_chosen, torch.zeros_like(z), z - z_max)
    log_neg_log_v = theta - z + torch.log1p(-torch.exp(gap)).clamp(min=torch.finfo(z.dtype).min)
    log_neg_log_v = torch.where(is_chosen, torch.zeros_like(z), log_neg_log_v)

    others = -torch.logaddexp(log_neg_log_v - normalized_logits, -z_max.expand_as(z))
    return torch.where(is_chosen, z_max.expand_as(z), others)


def _check_logits(logits: Sequence[Tensor]) -> None:
    if len(logits) == 0:
        raise ValueError("logits is empty; expected one (C_i,) tensor per categorical choice")
    for index, choice_logits in enumerate(logits):
        if choice_logits.dim() != 1 or choice_logits.shape[0] < 1:
            raise ValueError(
                f"logits[{index}] has shape {tuple(choice_logits.shape)}; "
                "expected (C_i,) with C_i >= 1"
            )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau (the relaxation temperature) must be positive, got {tau}")


def _evaluate_loss(loss_fn: LossFn, sample: list[Tensor], batch_size: int) -> Tensor:
    loss = loss_fn(sample)
    if loss.shape != (batch_size,):
        raise ValueError(
            f"loss_fn returned shape {tuple(loss.shape)}; "
            f"expected one loss per example, ({batch_size},)"
        )
    return loss


@dataclass
class _GumbelDraw:
    """One Gumbel-max draw: normalised logits theta, z = theta + g, b and s = softmax(z / tau)."""

    normalized_logits: list[Tensor]
    perturbed: list[Tensor]
    discrete: list[Tensor]
    relaxed: list[Tensor]


def _draw(
    logits: Sequence[Tensor],
    batch_size: int,
    tau: float,
    generator: torch.Generator | None,
) -> _GumbelDraw:
    _check_logits(logits)
    _check_batch_size(batch_size)
    draw = _GumbelDraw([], [], [], [])
    for choice_logits in logits:
        theta = torch.log_softmax(choice_logits, dim=-1)
        gumbel = sample_gumbel((batch_size, theta.shape[0]), theta, generator)
        perturbed = theta + gumbel
        draw.normalized_logits.append(theta)
        draw.perturbed.append(perturbed)
        draw.discrete.append(_one_hot_argmax(perturbed.detach()))
        draw.relaxed.append(torch.softmax(perturbed / tau, dim=-1))
    return draw


def _detach_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [tensor.detach() for tensor in tensors]


# ---------------------------------------------------------------------------------------------
# Estimators


@register_estimator("reinforce")
class ReinforceEstimator(GradientEstimator):
    """Score-function (REINFORCE) estimator with a moving-average baseline.

    surrogate = mean((L(b) - baseline) * log q(b)). The baseline is updated after use as
    baseline = baseline_decay * baseline + (1 - baseline_decay) * mean(L(b)), so it never depends
    on the current sample and the estimate stays unbiased. It starts at 0.
    """

    def __init__(self, baseline_decay: float = 0.1) -> None:
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        self.baseline_decay = baseline_decay
        self.baseline = 0.0

    def estimate(
        self,
        logits: Sequence[Tensor],
        loss_fn: LossFn,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> EstimateResult:
        # The temperature is unused here because only the discrete sample is evaluated.
        draw = _draw(logits, batch_size, 1.0, generator)
        loss = _evaluate_loss(loss_fn, draw.discrete, batch_size).detach()
        log_prob = _log_prob(draw.normalized_logits, draw.discrete)
        surrogate = ((loss - self.baseline) * log_prob).mean()

        mean_loss = loss.mean().item()
        decay = self.baseline_decay
        self.baseline = decay * self.baseline + (1.0 - decay) * mean_loss

        return EstimateResult(
            surrogate=surrogate,
            loss=loss,
            weight_sample=draw.discrete,
            discrete_sample=draw.discrete,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = float(state["baseline"])


@register_estimator("relaxed")
class RelaxedEstimator(GradientEstimator):
    """Gumbel-softmax estimator: surrogate = mean(L(s)), s = softmax((logits + g) / tau).

    Biased: it differentiates E[L(s)], not E[L(b)]. The bias falls with tau while the variance
    rises.
    """

    def __init__(self, tau: float = 1.0) -> None:
        _check_tau(tau)
        self.tau = tau

    def estimate(
        self,
        logits: Sequence[Tensor],
        loss_fn: LossFn,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> EstimateResult:
        draw = _draw(logits, batch_size, self.tau, generator)
        loss = _evaluate_loss(loss_fn, draw.relaxed, batch_size)
        return EstimateResult(
            surrogate=loss.mean(),
            loss=loss.detach(),
            weight_sample=_detach_all(draw.relaxed),
            discrete_sample=draw.discrete,
        )


def _control_variate_sample(draw: _GumbelDraw, tau: float) -> list[Tensor]:
    """Return s_eff: the value of s, with gradient ds/dphi - d softmax(z~ / tau)/dphi.

    A function c evaluated on s_eff then backpropagates grad c(s) - grad c(s~), the
    reparameterisation part of the REBAR and RELAX estimators, from one evaluation of c.
    """
    sample = []
    for theta, perturbed, discrete, relaxed in zip(
        draw.normalized_logits, draw.perturbed, draw.discrete, draw.relaxed
    ):
        conditional = torch.softmax(_conditional_gumbel(perturbed, theta, discrete) / tau, dim=-1)
        sample.append(relaxed - conditional + conditional.detach())
    return sample


@register_estimator("rebar")
class RebarEstimator(GradientEstimator):
    """REBAR estimator (Tucker et al., 2017) with eta = 1 and a fixed temperature tau.

    surrogate = mean(log q(b) * stopgrad(L(b) - L(s_eff))) + mean(L(s_eff)), with s_eff from
    ``_control_variate_sample``. Each call evaluates ``loss_fn`` twice: on b and on s_eff.
    """

    def __init__(self, tau: float = 0.4) -> None:
        _check_tau(tau)
        self.tau = tau

    def estimate(
        self,
        logits: Sequence[Tensor],
        loss_fn: LossFn,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> EstimateResult:
        draw = _draw(logits, batch_size, self.tau, generator)
        discrete_loss = _evaluate_loss(loss_fn, draw.discrete, batch_size).detach()
        control_sample = _control_variate_sample(draw, self.tau)
        relaxed_loss = _evaluate_loss(loss_fn, control_sample, batch_size)
        log_prob = _log_prob(draw.normalized_logits, draw.discrete)

        score_term = (log_prob * (discrete_loss - relaxed_loss.detach())).mean()
        surrogate = score_term + relaxed_loss.mean()
        return EstimateResult(
            surrogate=surrogate,
            loss=discrete_loss,
            weight_sample=_detach_all(draw.relaxed),
            discrete_sample=draw.discrete,
        )


@dataclass
class _PendingControlVariateStep:
    """Inputs of ``RelaxEstimator.step_control_variate``, stored by the latest ``estimate`` call.

    ``control_variate_gradient`` is g_r, the psi-dependent part of the logits gradient estimate,
    built with create_graph=True. ``estimate_gradient`` receives the full estimate g from tensor
    hooks while the caller runs ``surrogate.backward()``.
    """

    control_variate_gradient: tuple[Tensor, ...]
    estimate_gradient: list[Tensor | None]


@register_estimator("relax")
class RelaxEstimator(GradientEstimator):
    """RELAX estimator (Grathwohl et al., 2018) with a learned control variate.

    The control variate is c(z) = L(softmax(z / tau)) + r_psi(softmax(z / tau)), where r_psi is an
    MLP with one hidden layer on the flattened, concatenated relaxed sample:
    surrogate = mean(log q(b) * stopgrad(L(b) - c(s_eff))) + mean(c(s_eff)).
    The estimate is unbiased for every psi. Psi is trained with Adam to minimise the squared norm
    of the logits gradient estimate, which minimises its variance because the mean does not
    depend on psi.

    Psi step: ``estimate`` builds g_r, the part of the estimate that depends on psi (the r_psi
    terms only), with create_graph=True and registers tensor hooks that store the full estimate
    g during ``surrogate.backward()``. ``step_control_variate()`` then sets psi's gradient to
    2 * <g, dg_r/dpsi> = d|g|^2/dpsi and takes one Adam step. The variance is taken over the
    gradient with respect to the logits tensors passed to ``estimate``, not their leaves.

    The network is built on the first ``estimate`` call, when the input size sum(C_i) is known.
    Its output layer starts at zero, so the first estimate equals REBAR's, and its hidden layer is
    initialised from ``init_seed``, so construction does not consume the global random state.
    """

    def __init__(
        self,
        tau: float = 0.4,
        hidden_size: int = 32,
        lr: float = 1e-3,
        init_seed: int = 0,
    ) -> None:
        _check_tau(tau)
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be at least 1, got {hidden_size}")
        if not lr > 0:
            raise ValueError(
                f"lr (the Adam learning rate of the control variate) must be positive, got {lr}"
            )
        self.tau = tau
        self.hidden_size = hidden_size
        self.lr = lr
        self.init_seed = init_seed
        self.control_variate: nn.Sequential | None = None
        self.optimizer: torch.optim.Adam | None = None
        self._pending: _PendingControlVariateStep | None = None

    def estimate(
        self,
        logits: Sequence[Tensor],
        loss_fn: LossFn,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> EstimateResult:
        _check_logits(logits)
        # Aliases created here carry this call's hooks, so gradients from other graphs that use
        # the same logits never reach the stored estimate.
        aliases = [choice_logits.view_as(choice_logits) for choice_logits in logits]
        network = self._network_for(aliases)

        draw = _draw(aliases, batch_size, self.tau, generator)
        discrete_loss = _evaluate_loss(loss_fn, draw.discrete, batch_size).detach()
        control_sample = _control_variate_sample(draw, self.tau)
        relaxed_loss = _evaluate_loss(loss_fn, control_sample, batch_size)
        log_prob = _log_prob(draw.normalized_logits, draw.discrete)
        network_input = torch.cat(control_sample, dim=-1)

        # Frozen psi keeps surrogate.backward() from writing into psi's gradients.
        frozen_psi = {name: param.detach() for name, param in network.named_parameters()}
        residual = torch.func.functional_call(network, frozen_psi, (network_input,)).squeeze(-1)
        control = relaxed_loss + residual
        surrogate = (log_prob * (discrete_loss - control.detach())).mean() + control.mean()

        self._pending = self._prepare_control_variate_step(
            network, network_input, log_prob, aliases
        )
        return EstimateResult(
            surrogate=surrogate,
            loss=discrete_loss,
            weight_sample=_detach_all(draw.relaxed),
            discrete_sample=draw.discrete,
        )

    def step_control_variate(self) -> float:
        """Take one Adam step on psi to reduce the variance of the latest estimate.

        Call it after ``surrogate.backward()`` of the latest ``estimate`` call. Returns |g|^2,
        the squared norm of that call's logits gradient estimate. Raises RuntimeError if there is
        no estimate or its surrogate has not been backpropagated.
        """
        pending = self._pending
        if pending is None or self.control_variate is None or self.optimizer is None:
            raise RuntimeError(
                "step_control_variate() needs a prior estimate() call; call estimate() first"
            )
        if any(gradient is None for gradient in pending.estimate_gradient):
            raise RuntimeError(
                "the surrogate of the latest estimate has not been backpropagated; "
                "call result.surrogate.backward() before step_control_variate()"
            )
        estimate_gradient = [
            gradient for gradient in pending.estimate_gradient if gradient is not None
        ]

        params = list(self.control_variate.parameters())
        psi_gradients = torch.autograd.grad(
            pending.control_variate_gradient,
            params,
            grad_outputs=[2.0 * gradient for gradient in estimate_gradient],
            allow_unused=True,
        )
        for param, gradient in zip(params, psi_gradients):
            param.grad = torch.zeros_like(param) if gradient is None else gradient.detach()
        self.optimizer.step()
        self._pending = None
        return float(sum(gradient.square().sum() for gradient in estimate_gradient))

    def state_dict(self) -> dict[str, Any]:
        """Return copies of psi and the Adam state; None for both before the first estimate."""
        if self.control_variate is None or self.optimizer is None:
            return {"control_variate": None, "optimizer": None}
        # Copies, because Adam updates the live tensors in place after this call returns.
        return {
            "control_variate": copy.deepcopy(self.control_variate.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None
        network_state = state["control_variate"]
        if network_state is None:
            self.control_variate = None
            self.optimizer = None
            return
        first_weight = network_state["0.weight"]
        input_size = first_weight.shape[1]
        self._build_network(input_size, first_weight.device, first_weight.dtype)
        assert self.control_variate is not None and self.optimizer is not None
        self.control_variate.load_state_dict(network_state)
        self.optimizer.load_state_dict(state["optimizer"])

    def _network_for(self, logits: Sequence[Tensor]) -> nn.Sequential:
        input_size = sum(choice_logits.shape[0] for choice_logits in logits)
        device, dtype = logits[0].device, logits[0].dtype
        if self.control_variate is None:
            self._build_network(input_size, device, dtype)
        assert self.control_variate is not None
        expected_size = self.control_variate[0].in_features
        if input_size != expected_size:
            raise ValueError(
                f"the logits have {input_size} classes in total, but the control variate was "
                f"built for {expected_size}; use one RelaxEstimator per search space"
            )
        self._move_network(device, dtype)
        return self.control_variate

    def _build_network(self, input_size: int, device: torch.device, dtype: torch.dtype) -> None:
        network = nn.Sequential(
            nn.Linear(input_size, self.hidden_size),
            nn.Tanh(),
            nn.Linear(self.hidden_size, 1),
        )
        init_generator = torch.Generator().manual_seed(self.init_seed)
        bound = 1.0 / math.sqrt(input_size)
        with torch.no_grad():
            nn.init.uniform_(network[0].weight, -bound, bound, generator=init_generator)
            nn.init.uniform_(network[0].bias, -bound, bound, generator=init_generator)
            nn.init.zeros_(network[2].weight)
            nn.init.zeros_(network[2].bias)
        self.control_variate = network.to(device=device, dtype=dtype)
        self.optimizer = torch.optim.Adam(self.control_variate.parameters(), lr=self.lr)
        logger.debug(
            "built RELAX control variate: %d inputs, %d hidden units", input_size, self.hidden_size
        )

    def _move_network(self, device: torch.device, dtype: torch.dtype) -> None:
        assert self.control_variate is not None and self.optimizer is not None
        reference = self.control_variate[0].weight
        if reference.device == device and reference.dtype == dtype:
            return
        # Module.to keeps the Parameter objects, so the optimizer still refers to them, but Adam's
        # moment buffers must move too. In torch 2.14 Adam keeps "step" on the CPU unless
        # capturable or fused is set, and neither is set here.
        # NOTE: only dtype moves are tested. A CPU-to-GPU move has not been run.
        self.control_variate.to(device=device, dtype=dtype)
        for param_state in self.optimizer.state.values():
            for key, value in param_state.items():
                if key != "step" and isinstance(value, Tensor):
                    param_state[key] = value.to(device=device, dtype=dtype)

    def _prepare_control_variate_step(
        self,
        network: nn.Sequential,
        network_input: Tensor,
        log_prob: Tensor,
        aliases: list[Tensor],
    ) -> _PendingControlVariateStep:
        # The psi-dependent part of the surrogate: -r_psi(s~) in the score term (phi enters only
        # through log q) and r_psi(s_eff) in the reparameterisation term.
        score_residual = network(network_input.detach()).squeeze(-1)
        reparameterised_residual = network(network_input).squeeze(-1)
        residual_surrogate = (-log_prob * score_residual + reparameterised_residual).mean()
        control_variate_gradient = torch.autograd.grad(
            residual_surrogate, aliases, create_graph=True
        )

        pending = _PendingControlVariateStep(control_variate_gradient, [None] * len(aliases))
        # Registered after the autograd.grad call above, so only surrogate.backward() fills them.
        for index, alias in enumerate(aliases):
            alias.register_hook(_store_gradient_hook(pending.estimate_gradient, index))
        return pending


def _store_gradient_hook(slots: list[Tensor | None], index: int) -> Callable[[Tensor], None]:
    def store(gradient: Tensor) -> None:
        slots[index] = gradient.detach().clone()

    return store

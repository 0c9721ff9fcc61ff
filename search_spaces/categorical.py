"""Independent categorical distributions over architecture choices, shared by the spaces.

A space lists its choices: one categorical per edge input, edge op or layer. This class owns
their logits (phi) and everything that does not depend on what the choices mean: softening,
discrete and Gumbel-softmax samples, log-probability and entropy. A sample is a list of
(B, choices) tensors, B being the batch size for per-example sampling and 1 per minibatch.
"""

from collections.abc import Sequence

import torch
from torch import nn

Sample = list[torch.Tensor]


class CategoricalArchitecture(nn.Module):
    """Zero-initialised (uniform) logits, one vector per categorical choice."""

    def __init__(self, choice_counts: Sequence[int], softening_eps: float = 0.0):
        super().__init__()
        if softening_eps < 0:
            raise ValueError(f"softening_eps must be non-negative, got {softening_eps}")
        self.softening_eps = softening_eps
        self.arch_logits = nn.ParameterList(nn.Parameter(torch.zeros(count)) for count in choice_counts)

    def normalized_logits(self) -> list[torch.Tensor]:
        """Log-probabilities, softened to log(softmax(phi) + eps) when eps > 0.

        Softening keeps every choice's probability above eps / (1 + K eps), so choices that fell
        behind early in the search are still sampled now and then.
        """
        if self.softening_eps > 0:
            return [torch.log(torch.softmax(phi, -1) + self.softening_eps) for phi in self.arch_logits]
        return [torch.log_softmax(phi, -1) for phi in self.arch_logits]

    def sample_discrete(self, batch_size: int, generator: torch.Generator | None = None) -> Sample:
        sample = []
        for logits in self.normalized_logits():
            # Drawn on the CPU so that a CPU generator serves any device.
            probs = torch.softmax(logits.detach().cpu(), -1).expand(batch_size, -1)
            index = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            sample.append(nn.functional.one_hot(index, logits.numel()).to(logits))
        return sample

    def sample_relaxed(self, batch_size: int, tau: float, generator: torch.Generator | None = None) -> Sample:
        """Gumbel-softmax samples at temperature tau, differentiable in the logits."""
        sample = []
        for logits in self.normalized_logits():
            uniform = torch.rand(batch_size, logits.numel(), generator=generator).clamp_(1e-10, 1 - 1e-7)
            gumbel = -torch.log(-torch.log(uniform)).to(logits.device)
            sample.append(torch.softmax((logits + gumbel) / tau, -1))
        return sample

    def log_prob(self, sample: Sample) -> torch.Tensor:
        """(B,) log q(z) of one-hot samples."""
        return sum((s * torch.log_softmax(logits, -1)).sum(-1) for s, logits in zip(sample, self.normalized_logits()))

    def entropy(self) -> torch.Tensor:
        """Sum of the entropies of the (softened) categoricals, in nats."""
        per_choice = []
        for logits in self.normalized_logits():
            log_probs = torch.log_softmax(logits, -1)
            per_choice.append(-(log_probs.exp() * log_probs).sum())
        return torch.stack(per_choice).sum()

"""Step 3 of CTRL, the objective (METHOD.md §2), as a pure function of one rollout.

    maximise  E[ sum_k gamma_k log p̂_k(y_k | x_0)  -  sum_t ||mu_theta(x_t) - mu_pre(x_t)||^2 / (2 sigma_t^2) ]

The KL is summed over dimensions and steps, so gamma is the visible exponent of the target
p_gamma(x | c, y) ∝ prod_k p̂_k(y_k | x)^gamma_k p_pre(x | c).
"""

from __future__ import annotations

from torch import Tensor

from ..sampling import Trajectory

KL_CHOICES = ("sum", "mean")


def ctrl_objective(traj: Trajectory, log_probs: dict[str, Tensor], gammas: dict[str, float],
                   kl_reduction: str = "sum") -> tuple[Tensor, dict, Tensor]:
    """The loss to minimise (batch mean of KL - reward), per-term statistics and each sample's objective
    J_i = reward_i - KL_i (detached; the convergence meter's).

    kl_reduction "mean" divides the KL by the number of dimensions d, as the official code does (METHOD.md §3):
    the target is then p̂^(gamma d) p_pre, whatever gamma says. Kept to show that (docs/exactness.md), not as
    a default."""
    if kl_reduction not in KL_CHOICES:
        raise ValueError(f"kl_reduction={kl_reduction!r}; choose from {KL_CHOICES}")
    reward = sum(gammas[k] * lp for k, lp in log_probs.items())
    kl = traj.path_kl()
    if kl_reduction == "mean":
        kl = kl / traj.x0[0].numel()
    loss = (kl - reward).mean()
    stats = {"loss": loss.item(), "reward": reward.mean().item(), "kl": kl.mean().item()}
    stats.update({f"log_p/{k}": lp.mean().item() for k, lp in log_probs.items()})
    return loss, stats, (reward - kl).detach()

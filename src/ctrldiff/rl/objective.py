"""Step 3 of CTRL, the objective (METHOD.md §2), as a pure function of one rollout.

    maximise  E[ sum_k gamma_k log p̂_k(y_k | x_0)  -  sum_t ||mu_theta(x_t) - mu_pre(x_t)||^2 / (2 sigma_t^2) ]

The KL is summed over dimensions and steps, so gamma is the visible exponent of the target
p_gamma(x | c, y) ∝ prod_k p̂_k(y_k | x)^gamma_k p_pre(x | c).
"""

from __future__ import annotations

from torch import Tensor

from ..sampling import Trajectory


def ctrl_objective(traj: Trajectory, log_probs: dict[str, Tensor], gammas: dict[str, float]) -> tuple[Tensor, dict]:
    """The loss to minimise (batch mean of KL - reward) and per-term statistics."""
    reward = sum(gammas[k] * lp for k, lp in log_probs.items())
    kl = traj.path_kl()
    loss = (kl - reward).mean()
    stats = {"loss": loss.item(), "reward": reward.mean().item(), "kl": kl.mean().item()}
    stats.update({f"log_p/{k}": lp.mean().item() for k, lp in log_probs.items()})
    return loss, stats

"""The results tables (markdown): one row per method, quality and cost; with the target, the yardstick."""

from __future__ import annotations

import math

from .tasks.controls import Control


def _num(v: float | None) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"


def _row(method: str, vals: list) -> str:
    return f"| {method} | " + " | ".join(v if isinstance(v, str) else _num(v) for v in vals) + " |"


def results_table(results: dict, controls: list[Control]) -> str:
    """Markdown tables, one row per method: quality and cost; with the target, the yardstick (J, log Z, KL and
    log Z - J over the same requests) and the like-for-like columns on the requests the target is trusted on."""
    nan = float("nan")
    judged = [k for k in ("monitor_accuracy", "classifier_accuracy") if any(k in m for m in results.values())]
    cols = [f"{c.name} acc" for c in controls] + [f"{c.name} F1" for c in controls]
    cols += (["joint acc"] if len(controls) > 1 else []) + [JUDGES[k] for k in judged]
    cols += ["digit fidelity", "feature-FID", "net fwd/sample", "net bwd/sample", "s/sample"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, m in results.items():
        cost = m["cost_per_sample"]
        vals = [m[c.name]["accuracy"] for c in controls] + [m[c.name]["macro_f1"] for c in controls]
        vals += ([m["joint_accuracy"]] if len(controls) > 1 else []) + [m.get(k, nan) for k in judged]
        vals += [m["digit_fidelity"], m["feature_fid"], cost.get("forward_denoiser", nan),
                 cost.get("backward_denoiser", nan), m["seconds_per_sample"]]
        lines.append(_row(method, vals))
    if "target" not in results:
        return "\n".join(lines) + "\n"
    t = results["target"]
    lines += ["", (f"target: p_gamma by importance sampling over {t['samples']} base samples (feature-FID from their "
                   "weighted moments); monitor acc: the independent monitor classifiers' verdict, never optimised "
                   "against; reward-classifier acc: the reward classifiers' own. A method whose reward-classifier "
                   "acc exceeds its monitor acc by more than the target's margin has found where the reward "
                   "classifier is wrong (reward hacking)."), ""]
    lines += yardstick_table(results)
    lines += ["", ("| method | acc, trusted cells | monitor acc, trusted cells | reward-classifier acc, trusted cells | "
              "fidelity, trusted cells |"), "|---" * 5 + "|"]
    for method, m in results.items():
        tr = m["trusted"]
        lines.append(_row(method, [tr[k] for k in ("accuracy", "monitor_accuracy", "classifier_accuracy",
                                                   "digit_fidelity")]))
    if len(controls) > 1:
        lines += ["", "Per-corner joint accuracy:", "", "| method | " + " | ".join(results["base"]["per_corner"]) + " |",
                  "|---" * (len(results["base"]["per_corner"]) + 1) + "|"]
        for method, m in results.items():
            lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in m["per_corner"].values()) + " |")
    return "\n".join(lines) + "\n"


JUDGES = {"monitor_accuracy": "monitor acc", "classifier_accuracy": "reward-classifier acc"}


def yardstick_table(results: dict) -> list[str]:
    """J, log Z, KL and log Z - J (± Monte-Carlo error) of every method over the same requests: those the bank
    trusts, and all of them (log Z the larger of the bank's and the path weights' estimate); "—" where undefined."""
    t = results["target"]
    head = ["trusted: requests", "J", "log Z", "KL", "log Z − J", "log Z − J (path weights)",
            "all: requests (flagged)", "J", "log Z", "KL", "log Z − J"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for method, m in results.items():
        y = m.get("yardstick")
        if y is None:
            lines.append(_row(method, ["—"] * len(head)))
            continue
        tr, al = y["trusted"], y["all"]
        gap = (lambda v, se: "—" if math.isnan(v) else f"{v:.2f} ± {se:.2f}")
        lines.append(_row(method, [
            str(tr["requests"]), tr["J"], tr["log_z"], tr["kl"], gap(tr["gap"], tr["gap_se"]),
            gap(tr.get("gap_paths", math.nan), tr.get("gap_paths_se", math.nan)), f"{al['requests']} ({al['flagged']})",
            al["J"], al["log_z"], al["kl"], gap(al["gap"], al["gap_se"])]))
    src = ", ".join(f"{k} {v}" for k, v in t["log_z_source"].items())
    lines += ["", ("The yardstick: J = E[reward - path KL] of each method's meter paths (the same paths give the "
                   "path weights), log Z per request, "
                   "log Z − J = KL(P_θ ‖ P*) ≥ 0 in nats (± Monte-Carlo error). Trusted: the requests whose bank "
                   f"ESS ≥ the minimum (the target's {t['untrusted_cells']} others rest on a handful of base samples); "
                   "log Z from the bank, and beside it from the method's own path weights (they agree where the paths' "
                   "ESS is high; a small one biases the paths' estimate low). All: log Z per request the larger of the bank's and every method's path-weight "
                   f"estimate (both are low in expectation; taken from: {src}); flagged: requests where every "
                   "estimate's ESS is small, so there the gap is a lower bound. The target's J is log Z itself (its "
                   "gap is 0 by definition) and its KL is E_p*[reward] − log Z. \"—\": undefined (no path ratio "
                   "to the base: not one Gaussian chain, or a last step that is not the base's).")]
    return lines

"""Front geometry, pure functions of measured points: a method's front along its knob, the concave envelope
that mixtures of its settings reach, the best accuracy at a fidelity level; and the γ sweep's meter on common
requests."""

from __future__ import annotations

import itertools

import torch


def accuracy(metrics: dict, controls: list[str]) -> float:
    return metrics["joint_accuracy"] if len(controls) > 1 else metrics[controls[0]]["accuracy"]

def point(method: str, knobs: dict, m: dict, controls: list[str]) -> dict:
    """One setting of one method on a front: accuracy, digit fidelity, feature-FID and cost per sample."""
    cost = m.get("cost_per_sample", {})
    return {"method": method, "knobs": knobs, "accuracy": accuracy(m, controls), "digit_fidelity": m["digit_fidelity"],
            "feature_fid": m["feature_fid"], "seconds_per_sample": m["seconds_per_sample"],
            "passes": cost.get("forward_denoiser", 0) + cost.get("backward_denoiser", 0)}

def fronts(task: dict, seed: int, target: list[dict] | None = None) -> dict[str, list[dict]]:
    """Every method's points over its knob grid on one seed's models, CTRL's over gamma, the target's if given."""
    out: dict[str, list[dict]] = {}
    for p in task["tuning"][seed]:
        out.setdefault(p["method"], []).append(p)
    out["ctrl"] = [g["front"] for g in task["gamma"][seed].values()]
    if target is not None:
        out["target"] = target
    return out

def pareto(points: list[dict]) -> list[dict]:
    """The points no other beats in both accuracy and digit fidelity, by fidelity ascending (so by accuracy
    descending): a method's front along its knobs."""
    front = [p for p in points if not any(q["accuracy"] >= p["accuracy"] and q["digit_fidelity"] >= p["digit_fidelity"]
                                          and (q["accuracy"], q["digit_fidelity"]) != (p["accuracy"], p["digit_fidelity"])
                                          for q in points)]
    return sorted(front, key=lambda p: (p["digit_fidelity"], -p["accuracy"]))

def envelope(points: list[dict]) -> list[tuple[float, float]]:
    """The upper concave envelope of the (digit fidelity, accuracy) points, by fidelity ascending: drawing each
    sample from one setting or another at random reaches every convex combination of their points, so this, not
    the line between neighbours on the front, is what the method can reach."""
    top: dict[float, float] = {}
    for p in points:
        top[p["digit_fidelity"]] = max(top.get(p["digit_fidelity"], -1.0), p["accuracy"])
    hull: list[tuple[float, float]] = []
    for x, y in sorted(top.items()):
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (y - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (x - hull[-2][0])) >= 0:
            hull.pop()  # the last vertex lies on or below the chord from the one before it to (x, y)
        hull.append((x, y))
    return hull

def best_at(points: list[dict], fidelity: float) -> float | None:
    """The best accuracy at digit fidelity >= `fidelity` over every mixture of the method's settings: the largest
    value of the concave envelope (`envelope`) right of the level; None where no setting reaches it."""
    hull = envelope(points)
    if not hull or hull[-1][0] < fidelity:
        return None
    x_top, y_top = max(hull, key=lambda p: p[1])
    if x_top >= fidelity:
        return y_top
    (x0, y0), (x1, y1) = next((a, b) for a, b in itertools.pairwise(hull) if a[0] <= fidelity <= b[0])
    return y0 + (fidelity - x0) / (x1 - x0) * (y1 - y0)

def common_meter(meters: dict[float, dict]) -> dict[float, dict]:
    """log Z - J of each gamma's CTRL on one common set of requests: those the bank trusts at every gamma (the
    intersection: a larger gamma trusts fewer), and every request (log Z the larger of the bank's and the paths';
    flagged where both ESS are small)."""
    t = {g: {k: torch.tensor(v) for k, v in m.items() if isinstance(v, list)} for g, m in meters.items()}
    common = torch.stack([m["bank_ess"] >= meters[g]["min_ess"] for g, m in t.items()]).all(0)
    out = {}
    for g, m in t.items():
        best = torch.maximum(m["bank_log_z"], m["path_log_z"])
        flagged = (m["bank_ess"] < meters[g]["min_ess"]) & ~(m["path_ess"] >= meters[g]["min_path_ess"])
        out[g] = {"meter_common": (m["bank_log_z"] - m["j"])[common].mean().item(), "common_requests": int(common.sum()),
                  "meter_all": (best - m["j"]).mean().item(), "requests": best.numel(), "flagged": int(flagged.sum())}
    return out

def ms_per_sample(pts: list[dict]) -> list[float]:
    """The sampled points' cost (the target's, from the bank, has none: NaN)."""
    return [1000 * p["seconds_per_sample"] for p in pts if p["seconds_per_sample"] == p["seconds_per_sample"]]

"""Why a small share of one-step-late gradients costs Adam so much: stability of a delayed momentum step.

A model of one sharp direction of the loss: a quadratic of curvature 1 seen through Adam's
preconditioner, so `h` stands for lr * curvature / sqrt(v). A share `f` of each step's accumulated
gradient was computed one update earlier (in PACI at K = m, f is the stage's share of delayed
micro-batches; the mean Δ over stages); the rest is current:

    g_t = (1 - f) w_t + f w_{t-1}
    m_t = beta m_{t-1} + (1 - beta) g_t
    w_{t+1} = w_t - h u_t,   u_t = m_t                                  (Adam's first moment)
                             u_t = m_t + gamma (1 - beta) (g_t - m_t)   (gamma = 1: Nesterov, NAdam)

and, for `--compensate predict`, the late share taken at the weights predicted one step on.

It prints the largest h for which the step is stable. For Adam's update the answer has a closed
form: the eigenvalues solve z^2 - (1 + beta - h (1-beta)(1-f)) z + beta + h (1-beta) f = 0, so a
complex pair leaves the unit circle at h = 1/f, whatever beta is, and the real root at -1 at
h = 2 (1+beta) / ((1-beta)(1-2f)); the undelayed threshold 2 (1+beta)/(1-beta) = 38 at beta1 = 0.9
falls to 2.3 when 44% of the gradient is one step late. The script checks its grid against it. Adam trains at the edge of this threshold
(its preconditioned sharpness rises until it reaches it), so a lower threshold forces flatter,
worse regions at any learning rate: a hypothesis for what experiments/quality.py measures, not a
proof. This is linear algebra on 3 x 3 matrices and takes a second.

    .venv/bin/python experiments/stability.py
"""

from __future__ import annotations

import numpy as np

SHARES = (0.0, 0.1, 0.25, 0.44, 1.0)  # 0.44: PACI's mean Δ at P = 8, K = m = 8 (experiments/tta.py)


def step_matrix(h: float, beta: float, f: float, gamma: float, predict: bool = False) -> np.ndarray:
    """The linear map (w_t, w_{t-1}, m_{t-1}, m_{t-2}) -> (w_{t+1}, w_t, m_t, m_{t-1}). With
    `predict` the late share was computed at w_{t-1} - h m_{t-2}: the weights one step on, as the
    moments known then predicted them (`paci train --compensate predict`)."""
    g = np.array([1 - f, f, 0.0, -f * h if predict else 0.0])
    m = beta * np.array([0.0, 0.0, 1.0, 0.0]) + (1 - beta) * g
    u = m + gamma * (1 - beta) * (g - m)
    return np.array([np.array([1.0, 0.0, 0.0, 0.0]) - h * u, [1.0, 0.0, 0.0, 0.0], m, [0.0, 0.0, 1.0, 0.0]])


def threshold(beta: float, f: float, gamma: float, predict: bool = False) -> float:
    """The smallest h on a fine log grid at which the step stops contracting (the stable range
    starts at 0, so this is where stability is first lost)."""
    for h in np.geomspace(0.01, 2000, 4000):
        if max(abs(np.linalg.eigvals(step_matrix(h, beta, f, gamma, predict)))) >= 1 - 1e-12:
            return float(h)
    return float("inf")


def adam_threshold(beta: float, f: float) -> float:
    """The closed form for u_t = m_t (see above)."""
    real = 2 * (1 + beta) / ((1 - beta) * (1 - 2 * f)) if f < 0.5 else float("inf")
    return min(real, 1 / f if f > 0 else float("inf"))


def main() -> None:
    print("Largest stable preconditioned step h (curvature 1) against the share f of one-step-late gradient:\n")
    print("| update | beta1 | " + " | ".join(f"f = {f:g}" for f in SHARES) + " |")
    print("|---|---|" + "---|" * len(SHARES))
    for label, beta, gamma, predict in [("Adam (EMA momentum)", 0.9, 0.0, False),
                                        ("Adam (EMA momentum)", 0.99, 0.0, False),
                                        ("Adam, late share at predicted weights", 0.9, 0.0, True),
                                        ("Nesterov (NAdam)", 0.9, 1.0, False), ("Nesterov (NAdam)", 0.99, 1.0, False)]:
        found = [threshold(beta, f, gamma, predict) for f in SHARES]
        print(f"| {label} | {beta:g} | " + " | ".join(f"{h:.1f}" for h in found) + " |")
        if gamma == 0.0 and not predict:  # the grid agrees with the closed form to its spacing (0.3%)
            assert all(abs(h / adam_threshold(beta, f) - 1) < 5e-3 for h, f in zip(found, SHARES)), found


if __name__ == "__main__":
    main()

"""Chinchilla Approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta to training runs.

As in Hoffmann et al. (2022) and Epoch AI's replication (Besiroglu et al. 2024): minimise the
sum over runs of Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L) with delta = 1e-3,
A = exp(a), B = exp(b), E = exp(e), by L-BFGS from every point of a grid of starts, keeping the
best. Running scipy's L-BFGS-B 4,500 times costs minutes, so the grid is first descended by a
batched L-BFGS (numpy, all starts at once, analytic gradient); the best distinct basins it finds
are then polished by scipy's L-BFGS-B with tight tolerances. Bootstrap intervals resample the
runs (as integer weights) and refit each resample the same way from starts seeded by the full fit.

    python -m experiments.scaling.fit --points ../shared/data/chinchilla_figure4_points.csv \\
        --chinchilla --drop-highest-loss 5 --bootstrap 100 --out /tmp/chinchilla_fit
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import pathlib
import sys
import time

import numpy as np
from scipy.optimize import minimize

try:                                # L-BFGS-B's tiny BLAS calls run ~30x slower with OpenBLAS
    from threadpoolctl import threadpool_limits      # threads on a busy machine: use one
except ImportError:                 # (optional: only the speed of polishing depends on it)
    def threadpool_limits(limits=None):
        return contextlib.nullcontext()

from core import cli
from core.config import ConfigError, DataError
from experiments.scaling import isoflop
from experiments.scaling.points import Points, drop_highest_loss, load_points

HUBER_DELTA = 1e-3
NAMES = ("a", "b", "e", "alpha", "beta")              # the order of theta's columns
# Chinchilla's / Epoch's grid of starts: 5 x 5 x 5 x 6 x 6 = 4,500.
GRID = {"a": np.arange(0, 30, 5.0), "b": np.arange(0, 30, 5.0), "e": np.arange(-1, 1.5, 0.5),
        "alpha": np.arange(0, 2.5, 0.5), "beta": np.arange(0, 2.5, 0.5)}


def start_grid(grid: dict | None = None) -> np.ndarray:
    """All combinations of the grid's values, one start per row, columns in NAMES order."""
    grid = GRID if grid is None else grid
    return np.array(list(itertools.product(*(grid[name] for name in NAMES))), dtype=np.float64)


def huber_objective(theta_SP: np.ndarray, logs: tuple, weights, delta: float = HUBER_DELTA):
    """Weighted sum of Huber losses of log-space residuals and its gradient, for S parameter
    vectors at once. logs = (log N, log D, log L), each of length n; weights is (n,) or (S, n)
    (bootstrap resamples are integer weights)."""
    logN_n, logD_n, logL_n = logs
    a, b, e, alpha, beta = (theta_SP[:, i:i + 1] for i in range(5))
    t1_Sn = a - alpha * logN_n
    t2_Sn = b - beta * logD_n
    top_Sn = np.maximum(np.maximum(t1_Sn, t2_Sn), e)
    w1_Sn, w2_Sn, w3_Sn = np.exp(t1_Sn - top_Sn), np.exp(t2_Sn - top_Sn), np.exp(e - top_Sn)
    total_Sn = w1_Sn + w2_Sn + w3_Sn
    r_Sn = top_Sn + np.log(total_Sn) - logL_n
    abs_r = np.abs(r_Sn)
    huber_Sn = np.where(abs_r <= delta, 0.5 * r_Sn ** 2, delta * (abs_r - 0.5 * delta))
    value_S = np.sum(weights * huber_Sn, axis=1)
    dr_Sn = weights * np.clip(r_Sn, -delta, delta) / total_Sn       # d huber / d LSE, softmax
    g1_Sn, g2_Sn = dr_Sn * w1_Sn, dr_Sn * w2_Sn
    grad_SP = np.stack([g1_Sn.sum(1), g2_Sn.sum(1), (dr_Sn * w3_Sn).sum(1),
                        -(g1_Sn * logN_n).sum(1), -(g2_Sn * logD_n).sum(1)], axis=1)
    return value_S, grad_SP


def _two_loop(g_SP, s_SMP, y_SMP, rho_SM):
    """L-BFGS direction -H g for every row; history slot -1 is the newest, rho = 0 marks empty."""
    q_SP = g_SP.copy()
    alphas = []
    for i in reversed(range(s_SMP.shape[1])):
        alpha_S = rho_SM[:, i] * np.sum(s_SMP[:, i] * q_SP, axis=1)
        q_SP -= alpha_S[:, None] * y_SMP[:, i]
        alphas.append(alpha_S)
    yy_S = np.sum(y_SMP[:, -1] ** 2, axis=1)
    has_history = rho_SM[:, -1] > 0
    gamma_S = np.where(has_history, np.sum(s_SMP[:, -1] * y_SMP[:, -1], 1) / np.where(
        has_history, yy_S, 1.0), 1.0 / np.maximum(np.linalg.norm(g_SP, axis=1), 1e-300))
    r_SP = gamma_S[:, None] * q_SP
    for i, alpha_S in zip(range(s_SMP.shape[1]), reversed(alphas)):
        beta_S = rho_SM[:, i] * np.sum(y_SMP[:, i] * r_SP, axis=1)
        r_SP += (alpha_S - beta_S)[:, None] * s_SMP[:, i]
    return -r_SP


def batched_lbfgs(fun, x0_SP, max_iter=400, memory=10, rtol=1e-10, max_halvings=50):
    """L-BFGS with a backtracking (Armijo) line search, run on every row of x0 at once. fun(x,
    rows) returns (values, gradients) for those rows. A row stops when a step improves its value
    by less than rtol (relative) or no step improves it. Returns (x, values)."""
    x_SP = np.array(x0_SP, dtype=np.float64)
    S, P = x_SP.shape
    f_S, g_SP = fun(x_SP, np.arange(S))
    s_SMP, y_SMP, rho_SM = np.zeros((S, memory, P)), np.zeros((S, memory, P)), np.zeros((S, memory))
    active = np.flatnonzero(np.isfinite(f_S))
    for _ in range(max_iter):
        if not len(active):
            break
        g = g_SP[active]
        d_AP = _two_loop(g, s_SMP[active], y_SMP[active], rho_SM[active])
        slope_A = np.sum(g * d_AP, axis=1)
        uphill = ~(slope_A < 0)
        if uphill.any():                 # a stale curvature pair: restart from steepest descent
            rho_SM[active[uphill]] = 0.0
            norm_U = np.maximum(np.linalg.norm(g[uphill], axis=1), 1e-300)
            d_AP[uphill] = -g[uphill] / norm_U[:, None]
            slope_A[uphill] = np.sum(g[uphill] * d_AP[uphill], axis=1)
        step_A = np.ones(len(active))
        new_x, new_f, new_g = x_SP[active].copy(), f_S[active].copy(), g.copy()
        moved = np.zeros(len(active), bool)
        pending = np.arange(len(active))
        for _ in range(max_halvings):
            rows = active[pending]
            trial = x_SP[rows] + step_A[pending, None] * d_AP[pending]
            with np.errstate(over="ignore", invalid="ignore"):
                f_t, g_t = fun(trial, rows)
            armijo = np.isfinite(f_t) & (
                f_t <= f_S[rows] + 1e-4 * step_A[pending] * slope_A[pending])
            done = pending[armijo]
            new_x[done], new_f[done], new_g[done] = trial[armijo], f_t[armijo], g_t[armijo]
            moved[done] = True
            pending = pending[~armijo]
            if not len(pending):
                break
            step_A[pending] *= 0.5
        s_AP, y_AP = new_x - x_SP[active], new_g - g
        sy_A = np.sum(s_AP * y_AP, axis=1)
        keep = moved & (sy_A > 1e-12 * np.maximum(np.sum(y_AP ** 2, axis=1), 1e-300))
        rows = active[keep]
        s_SMP[rows] = np.roll(s_SMP[rows], -1, axis=1)
        y_SMP[rows] = np.roll(y_SMP[rows], -1, axis=1)
        rho_SM[rows] = np.roll(rho_SM[rows], -1, axis=1)
        s_SMP[rows, -1], y_SMP[rows, -1], rho_SM[rows, -1] = s_AP[keep], y_AP[keep], 1 / sy_A[keep]
        gain_A = f_S[active] - new_f
        x_SP[active], f_S[active], g_SP[active] = new_x, new_f, new_g
        still = moved & (gain_A > rtol * np.abs(new_f))
        active = active[still]
    return x_SP, f_S


def polish(theta_P: np.ndarray, logs: tuple, weights, delta: float = HUBER_DELTA):
    """scipy L-BFGS-B from theta with the analytic gradient. The objective is ~1e-3, and
    L-BFGS-B's ftol is relative to max(|f|, 1), i.e. absolute here, so it is set far below the
    default (the fit is sensitive to stopping early, as Epoch AI noted)."""
    def fun(theta):
        value, grad = huber_objective(theta[None], logs, weights, delta)
        return value[0], grad[0]
    with threadpool_limits(limits=1):
        result = minimize(fun, theta_P, jac=True, method="L-BFGS-B",
                          options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000,
                                   "maxfun": 50000, "maxcor": 20})
    return result.x, float(result.fun)


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    """Fitted constants of L(N, D) = E + A / N^alpha + B / D^beta (a, b, e are logs of A, B, E)."""
    a: float
    b: float
    e: float
    alpha: float
    beta: float
    objective: float = float("nan")     # the summed Huber loss at the optimum
    num_points: int = 0

    A = property(lambda self: float(np.exp(self.a)))
    B = property(lambda self: float(np.exp(self.b)))
    E = property(lambda self: float(np.exp(self.e)))

    @classmethod
    def from_constants(cls, E, A, B, alpha, beta) -> "ScalingFit":
        return cls(float(np.log(A)), float(np.log(B)), float(np.log(E)), alpha, beta)

    @property
    def theta(self) -> np.ndarray:
        return np.array([self.a, self.b, self.e, self.alpha, self.beta])

    def loss(self, params, tokens) -> np.ndarray:
        return self.E + self.A / np.asarray(params) ** self.alpha + \
            self.B / np.asarray(tokens) ** self.beta

    def exponents(self) -> dict:
        """N_opt = G (C/6)^a and D_opt = (C/6)^b / G under C = 6 N D, from setting dL/dN = 0
        along a fixed-compute line: alpha A N^-alpha = beta B D^-beta."""
        total = self.alpha + self.beta
        return {"a": self.beta / total, "b": self.alpha / total,
                "G": float((self.alpha * self.A / (self.beta * self.B)) ** (1 / total))}

    def optimal(self, flops) -> dict:
        """Compute-optimal parameters, tokens, tokens per parameter and loss at budgets C."""
        flops = np.asarray(flops, dtype=np.float64)
        ex = self.exponents()
        params = ex["G"] * (flops / 6) ** ex["a"]
        tokens = (flops / 6) ** ex["b"] / ex["G"]
        return {"flops": flops, "params": params, "tokens": tokens,
                "tokens_per_param": tokens / params, "loss": self.loss(params, tokens)}

    def constants(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}


def _logs(points: Points) -> tuple:
    return np.log(points.params), np.log(points.tokens), np.log(points.loss)


def fit_approach3(points: Points, starts: np.ndarray | None = None, delta: float = HUBER_DELTA,
                  num_polished: int = 8) -> ScalingFit:
    """Best fit over a grid of starts (default: the full 4,500-start Chinchilla grid)."""
    if len(points) < 5:
        raise ValueError(f"Approach 3 fits 5 constants and needs at least 5 points, got "
                         f"{len(points)}")
    starts = start_grid() if starts is None else np.atleast_2d(np.asarray(starts, np.float64))
    logs = _logs(points)
    weights = np.ones(len(points))
    x_SP, f_S = batched_lbfgs(lambda x, rows: huber_objective(x, logs, weights, delta), starts)
    best = float("inf"), None
    for theta in _distinct_best(x_SP, f_S, num_polished):
        theta, value = polish(theta, logs, weights, delta)
        if value < best[0]:
            best = value, theta
    if best[1] is None:
        raise RuntimeError("every start diverged; check the points (loss in nats, N and D "
                           "as counts)")
    return ScalingFit(*map(float, best[1]), objective=best[0], num_points=len(points))


def _distinct_best(x_SP, f_S, count: int) -> list[np.ndarray]:
    """The best rows of x, at most one per basin (rows equal to 2 decimals count as one)."""
    order = np.argsort(np.where(np.isfinite(f_S), f_S, np.inf))
    seen, picked = set(), []
    for i in order:
        key = tuple(np.round(x_SP[i], 2))
        if np.isfinite(f_S[i]) and key not in seen:
            seen.add(key)
            picked.append(x_SP[i])
        if len(picked) == count:
            break
    return picked


def bootstrap(points: Points, fit: ScalingFit, resamples: int, seed: int = 0,
              extra_starts: int = 4, delta: float = HUBER_DELTA) -> np.ndarray:
    """Refits on `resamples` resamples of the runs drawn with replacement. Each starts from the
    full fit and `extra_starts` grid points drawn at random (Epoch's bootstrap drew 5).
    Returns the fitted theta of every resample, (resamples, 5)."""
    if resamples < 1:
        raise ValueError(f"bootstrap needs at least 1 resample, got {resamples}")
    rng = np.random.default_rng(seed)
    n, grid = len(points), start_grid()
    counts_RN = np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                          for _ in range(resamples)])
    starts = [np.vstack([fit.theta, grid[rng.choice(len(grid), extra_starts, replace=False)]])
              for _ in range(resamples)]
    k = extra_starts + 1
    starts_SP, weights_SN = np.concatenate(starts), np.repeat(counts_RN, k, axis=0).astype(float)
    logs = _logs(points)
    x_SP, f_S = batched_lbfgs(
        lambda x, rows: huber_objective(x, logs, weights_SN[rows], delta), starts_SP)
    best = np.nanargmin(np.where(np.isfinite(f_S), f_S, np.nan).reshape(resamples, k), axis=1)
    thetas = x_SP.reshape(resamples, k, 5)[np.arange(resamples), best]
    return np.stack([polish(theta, logs, counts_RN[r].astype(float), delta)[0]
                     for r, theta in enumerate(thetas)])


def summarise(fit: ScalingFit, thetas_RP: np.ndarray | None, budgets, level: float = 0.95):
    """Point estimates with percentile intervals of constants, exponents and allocations."""
    def describe(value_fn):
        value = value_fn(fit)
        out = {"value": value}
        if thetas_RP is not None and len(thetas_RP):
            samples = np.array([value_fn(ScalingFit(*t)) for t in thetas_RP])
            tail = 100 * (1 - level) / 2
            out["interval"] = np.percentile(samples, [tail, 100 - tail], axis=0).tolist()
        return out
    result = {name: describe(lambda f, n=name: f.constants()[n]) for name in fit.constants()}
    for name in ("a", "b", "G"):
        result[name] = describe(lambda f, n=name: f.exponents()[n])
    rows = []
    for budget in budgets:
        optimal = fit.optimal(budget)
        row = {k: float(v) for k, v in optimal.items()}
        row["tokens_per_param_interval"] = describe(
            lambda f, c=budget: float(f.optimal(c)["tokens_per_param"])).get("interval")
        rows.append(row)
    return {"constants": result, "compute_optimal": rows, "objective": fit.objective,
            "num_points": fit.num_points}


def _flops_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{flag} must be comma-separated positive FLOPs like 1e21,5.76e23; "
                          f"got {text!r}")
    return values


def _default_budgets(points: Points) -> list[float]:
    """The data's smallest and largest budgets, then 10x and 100x beyond them."""
    top = float(points.flops.max())
    return [float(points.flops.min()), top, 10 * top, 100 * top]


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--points", required=True, help="CSV of runs (params,tokens[,flops],loss)")
    parser.add_argument("--chinchilla", action="store_true",
                        help="the file is in the Chinchilla Figure-4 layout")
    parser.add_argument("--drop-highest-loss", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=0, help="resamples (0: no intervals)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=float, default=0.95, help="interval coverage")
    parser.add_argument("--budgets", default="", help="FLOPs to report allocations at")
    parser.add_argument("--isoflop-centers", default="",
                        help="budgets of the IsoFLOP groups (default: Chinchilla's with "
                             "--chinchilla, else groups separated by gaps in log10 C)")
    parser.add_argument("--isoflop-tolerance", type=float, default=0.05,
                        help="dex around a centre, or the largest gap inside one group")
    parser.add_argument("--out", default="", help="folder for fit.json and the plots")
    args = parser.parse_args(argv)
    if not 0 < args.level < 1 or args.bootstrap < 0:
        raise ConfigError(f"--level must lie in (0, 1) and --bootstrap be >= 0; got "
                          f"{args.level} and {args.bootstrap}")
    try:
        points = load_points(args.points, chinchilla=args.chinchilla)
        used = drop_highest_loss(points, args.drop_highest_loss)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as error:
        raise DataError(cli.one_line(error)) from None
    budgets = _flops_list(args.budgets, "--budgets") if args.budgets else _default_budgets(used)
    started = time.perf_counter()
    fit = fit_approach3(used)
    fit_seconds = time.perf_counter() - started
    thetas = bootstrap(used, fit, args.bootstrap, args.seed) if args.bootstrap else None
    boot_seconds = time.perf_counter() - started - fit_seconds
    if args.isoflop_centers:
        centers = _flops_list(args.isoflop_centers, "--isoflop-centers")
    else:
        centers = isoflop.CHINCHILLA_BUDGETS if args.chinchilla else None
    try:
        iso = isoflop.fit_isoflop(used, centers=centers, tolerance_dex=args.isoflop_tolerance)
        approach2 = iso.summary(budgets)
    except ValueError as error:        # too few usable groups: Approach 3 still stands
        iso, approach2 = None, {"error": str(error)}
    result = {
        "points": {"file": args.points, "layout": "chinchilla" if args.chinchilla else "study",
                   "total": len(points), "used": len(used),
                   "dropped_highest_loss": args.drop_highest_loss},
        "approach3": {**summarise(fit, thetas, budgets, args.level),
                      "huber_delta": HUBER_DELTA, "starts": len(start_grid())},
        "approach2": approach2,
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "level": args.level},
        "seconds": {"fit": round(fit_seconds, 2), "bootstrap": round(boot_seconds, 2)},
    }
    if args.out:
        from experiments.scaling import plots
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["files"] = [str(p) for p in plots.write_all(used, fit, iso, out)]
        result["files"].append(str(out / "fit.json"))
        (out / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    cli.main_entry(main)

"""Scaling-law fits: Approach 3 against Epoch AI's refit of the published Chinchilla points and
against synthetic runs of known constants, Approach 2 on synthetic IsoFLOP grids, the closed-form
compute-optimal allocation against brute force, the CLI end to end, and bad input."""
import json
import pathlib

import numpy as np
import pytest

from core.config import DataError
from experiments.scaling import fit, isoflop, points

REPO = pathlib.Path(__file__).resolve().parents[1]
CHINCHILLA_CSV = REPO.parent / "shared" / "data" / "chinchilla_figure4_points.csv"
# Hoffmann et al. 2022's constants, used as the truth of the synthetic runs.
PAPER = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TRUTH = fit.ScalingFit.from_constants(**PAPER)


def synthetic_grid(noise: float, seed: int = 0) -> points.Points:
    """8 model sizes x 8 token counts, loss from TRUTH times log-normal noise."""
    n_NN, d_NN = np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8))
    n, d = n_NN.ravel(), d_NN.ravel()
    rng = np.random.default_rng(seed)
    return points.make_points(n, d, TRUTH.loss(n, d) * np.exp(rng.normal(0, noise, n.shape)))


def synthetic_isoflop(budgets, noise: float, seed: int = 0, sizes: int = 9) -> points.Points:
    """Per budget, sizes spread two decades around the 20-tokens-per-parameter guess (not
    around TRUTH's optimum, which an experimenter would not know)."""
    rng = np.random.default_rng(seed)
    n = np.concatenate([np.sqrt(c / 120) * np.geomspace(0.1, 10, sizes) for c in budgets])
    c = np.repeat(budgets, sizes)
    d = c / (6 * n)
    return points.make_points(n, d, TRUTH.loss(n, d) * np.exp(rng.normal(0, noise, n.shape)))


@pytest.fixture(scope="module")
def chinchilla():
    if not CHINCHILLA_CSV.is_file():
        pytest.skip(f"{CHINCHILLA_CSV} is not here (the published Chinchilla Figure-4 points are "
                    "read in place from ../shared/data, never copied into the repo)")
    return points.load_chinchilla_csv(CHINCHILLA_CSV)


def test_chinchilla_points_load(chinchilla):
    assert len(chinchilla) == 245
    np.testing.assert_allclose(6 * chinchilla.params * chinchilla.tokens, chinchilla.flops)
    kept = points.drop_highest_loss(chinchilla, 5)
    assert len(kept) == 240 and kept.loss.max() < np.sort(chinchilla.loss)[-5]


def test_approach3_reproduces_epoch_refit(chinchilla):
    """Epoch AI (Besiroglu et al. 2024) refit the 240 points left after dropping the 5 of
    highest loss: E=1.82, A=482, B=2085, alpha=0.35, beta=0.37."""
    kept = points.drop_highest_loss(chinchilla, 5)
    result = fit.fit_approach3(kept)
    assert abs(result.E - 1.82) < 0.05
    assert abs(result.alpha - 0.35) < 0.02 and abs(result.beta - 0.37) < 0.02
    assert abs(result.A / 482 - 1) < 0.10 and abs(result.B / 2085 - 1) < 0.15
    # Descending from Epoch's published constants finds no better minimum than the grid did.
    epoch = fit.ScalingFit.from_constants(1.82, 482, 2085, 0.35, 0.37)
    logs = (np.log(kept.params), np.log(kept.tokens), np.log(kept.loss))
    _, from_epoch = fit.polish(epoch.theta, logs, np.ones(len(kept)))
    assert result.objective <= from_epoch + 1e-12
    # Chinchilla's a = beta / (alpha + beta) came out 0.46; Epoch's refit gives about 0.51.
    assert 0.49 < result.exponents()["a"] < 0.53


def test_approach3_recovers_known_constants():
    result = fit.fit_approach3(synthetic_grid(noise=0.005))
    assert abs(result.E - PAPER["E"]) < 0.03
    assert abs(result.alpha - PAPER["alpha"]) < 0.02
    assert abs(result.beta - PAPER["beta"]) < 0.02
    assert abs(result.A / PAPER["A"] - 1) < 0.15 and abs(result.B / PAPER["B"] - 1) < 0.15
    assert abs(result.exponents()["a"] - TRUTH.exponents()["a"]) < 0.01


def test_batched_descent_finds_the_best_of_scipy_from_every_start():
    """The fast path (batched L-BFGS over the grid, then scipy on the best basins) must reach
    the same minimum as running scipy's L-BFGS-B from every start, the slow original method."""
    grid = synthetic_grid(noise=0.01, seed=1)
    starts = fit.start_grid({"a": [0, 20], "b": [5, 25], "e": [-1, 1], "alpha": [0, 1.5],
                             "beta": [0.5, 2]})
    logs = (np.log(grid.params), np.log(grid.tokens), np.log(grid.loss))
    each = [fit.polish(start, logs, np.ones(len(grid)))[1] for start in starts]
    result = fit.fit_approach3(grid, starts=starts)
    assert result.objective <= min(each) * (1 + 1e-9)


def test_bootstrap_intervals_cover_truth_and_are_seeded():
    grid = synthetic_grid(noise=0.005)
    result = fit.fit_approach3(grid, starts=fit.start_grid(
        {"a": [0, 10], "b": [0, 10], "e": [0.0], "alpha": [0.5], "beta": [0.5]}))
    thetas = fit.bootstrap(grid, result, resamples=12, seed=3)
    assert thetas.shape == (12, 5)
    np.testing.assert_array_equal(thetas, fit.bootstrap(grid, result, resamples=12, seed=3))
    summary = fit.summarise(result, thetas, budgets=[1e21])
    for name in ("alpha", "beta", "E"):
        low, high = summary["constants"][name]["interval"]
        assert low < PAPER[name] < high, (name, low, high)
        assert high - low < 0.1
    low, high = summary["compute_optimal"][0]["tokens_per_param_interval"]
    assert low < summary["compute_optimal"][0]["tokens_per_param"] < high


def test_compute_optimal_closed_form_matches_brute_force():
    for flops in (1e18, 5.76e23):
        n = np.geomspace(1e5, 1e14, 400_001)
        losses = TRUTH.loss(n, flops / (6 * n))
        best = n[np.argmin(losses)]
        optimal = TRUTH.optimal(flops)
        assert abs(optimal["params"] / best - 1) < 1e-3
        np.testing.assert_allclose(6 * optimal["params"] * optimal["tokens"], flops)
        np.testing.assert_allclose(optimal["tokens_per_param"], optimal["tokens"] /
                                   optimal["params"])
    exponents = TRUTH.exponents()
    assert exponents["a"] == pytest.approx(0.28 / 0.62) and exponents["b"] == pytest.approx(
        0.34 / 0.62)


def test_approach2_recovers_exponent():
    budgets = np.array([1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21])
    result = isoflop.fit_isoflop(synthetic_isoflop(budgets, noise=0.003))
    assert len(result.profiles) == 7 and all(p.used for p in result.profiles)
    np.testing.assert_allclose([p.flops for p in result.profiles], budgets, rtol=1e-9)
    assert abs(result.a - TRUTH.exponents()["a"]) < 0.01
    assert result.a + result.b == pytest.approx(1.0)
    # Each parabola's minimum is near the true optimum at its budget.
    true_opt = TRUTH.optimal(budgets)["params"]
    np.testing.assert_allclose([p.params_opt for p in result.profiles], true_opt, rtol=0.15)


def test_approach2_grouping_and_unbracketed_minimum():
    flops = np.array([1e18, 1.05e18, 3e18, 2.9e18, 1e19])
    assert [list(i) for _, i in isoflop.group_by_compute(flops)] == [[0, 1], [2, 3], [4]]
    by_centers = isoflop.group_by_compute(flops, centers=[1e18, 3e18], tolerance_dex=0.03)
    assert [(c, list(i)) for c, i in by_centers] == [(1e18, [0, 1]), (3e18, [2, 3])]
    by_edges = isoflop.group_by_compute(flops, edges=[5e17, 2e18, 2e19])
    assert [list(i) for _, i in by_edges] == [[0, 1], [2, 3, 4]]
    # Only sizes far larger than optimal at one budget: its minimum is an extrapolation.
    runs = synthetic_isoflop(np.array([1e19, 1e20, 1e21]), noise=0.0)
    big = np.sqrt(1e22 / 120) * np.geomspace(3, 30, 6)
    extra = points.make_points(big, 1e22 / (6 * big), TRUTH.loss(big, 1e22 / (6 * big)))
    both = points.Points(*(np.concatenate([getattr(runs, k), getattr(extra, k)])
                           for k in ("params", "tokens", "flops", "loss")))
    result = isoflop.fit_isoflop(both)
    assert [p.used for p in result.profiles] == [True, True, True, False]
    assert "outside" in result.profiles[-1].reason
    with pytest.raises(ValueError, match="at least 2 IsoFLOP groups"):
        isoflop.fit_isoflop(extra)


def test_cli_writes_fit_and_plots(tmp_path, capsys):
    budgets = np.array([1e17, 1e18, 1e19, 1e20])
    runs = synthetic_isoflop(budgets, noise=0.002, sizes=7)
    table = tmp_path / "runs.csv"
    rows = ["params,tokens,loss,run"] + [
        f"{n:.17g},{d:.17g},{loss:.17g},r{i}"
        for i, (n, d, loss) in enumerate(zip(runs.params, runs.tokens, runs.loss))]
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "fit"
    printed = fit.main(["--points", str(table), "--bootstrap", "3", "--budgets", "1e21,1e23",
                        "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads((out / "fit.json").read_text())
    constants = printed["approach3"]["constants"]
    assert abs(constants["alpha"]["value"] - 0.34) < 0.03
    assert len(constants["alpha"]["interval"]) == 2
    assert abs(printed["approach2"]["a"] - TRUTH.exponents()["a"]) < 0.02
    assert [row["flops"] for row in printed["approach3"]["compute_optimal"]] == [1e21, 1e23]
    for name in ("loss_vs_compute.png", "loss_surface.png", "isoflop.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="does not exist"):
        fit.main(["--points", str(tmp_path / "absent.csv")])


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("params,tokens,loss\n", "no data rows"),
    ("params,tokens\n1e6,1e9\n", r"missing column\(s\) \['loss'\]"),
    ("params,tokens,loss\n1e6,1e9,3.1\n1e6,0,3.0\n", "line 3: column 'tokens' must be a positive"),
    ("params,tokens,loss\n1e6,1e9,-2\n", "line 2: column 'loss' must be a positive"),
    ("params,tokens,loss\n1e6,lots,3.1\n", "'lots', which is not a number"),
    ("params,tokens,flops,loss\n1e6,1e9,,3.1\n", "column 'flops' holds ''"),
])
def test_bad_study_csv(tmp_path, text, message):
    path = tmp_path / "runs.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        points.load_study_csv(path)


def test_other_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        points.load_study_csv(tmp_path / "nothing.csv")
    path = tmp_path / "figure4.csv"
    path.write_text("x,y,Model Size,loss\n1,2,1e8,3.0\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Training FLOP'\]"):
        points.load_chinchilla_csv(path)
    with pytest.raises(ValueError, match="different lengths"):
        points.make_points([1e6, 2e6], [1e9], [3.0, 2.9])
    with pytest.raises(ValueError, match="'params' must be a positive finite number"):
        points.make_points([1e6, np.nan], [1e9, 1e9], [3.0, 2.9])
    few = points.make_points([1e6, 2e6, 4e6], [1e9, 1e9, 1e9], [3.0, 2.9, 2.8])
    with pytest.raises(ValueError, match="at least 5 points"):
        fit.fit_approach3(few)
    with pytest.raises(ValueError, match="cannot drop 3 of 3"):
        points.drop_highest_loss(few, 3)
    with pytest.raises(ValueError, match="at least 1 resample"):
        fit.bootstrap(synthetic_grid(0.0), TRUTH, resamples=0)

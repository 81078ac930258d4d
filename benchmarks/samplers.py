"""Sampler accuracy against the exact PF-ODE solution, and sampler overhead against the network's own cost.

``python -m benchmarks samplers`` writes ``benchmarks/results/samplers.{md,json,png}``.

1. Error vs NFE: every ODE sampler on EDM's grid (Karras rho = 7 on [0.002, 80]) integrates the
   probability-flow ODE of the analytic 2-D mixture from the same noise; the error is the RMS distance of
   its output to the exact ODE solution at sigma = 0 (a 2000-step RK4 solve in log-sigma, checked against
   1000 steps). Log-log plot and table; slopes are the measured orders in NFE.
2. Overhead: wall time of a whole sampling run divided by (NFE x time of one bare network forward), for
   (a) the quickstart-sized ``diffusion_lab.nets.unet.UNet`` (8x8x1, channels 32-64) used as a discrete
   1000-step eps-model, our samplers driving it through ``DiscreteEpsDenoiser``, side by side with
   diffusers' DDIMScheduler and DPMSolverMultistepScheduler driving the same network; and (b) the analytic
   mixture denoiser. Each run is timed interleaved with a loop of the same number of bare forwards on the
   same inputs (fastest of several runs each), so load on a shared machine affects both alike.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import torch

from benchmarks._common import RESULTS_DIR, machine_info, markdown_table, pyplot, write_results
from diffusion_lab.diffusion.analytic import toy_mixture_2d
from diffusion_lab.diffusion.discrete import DiscreteEpsDenoiser
from diffusion_lab.diffusion.samplers import SAMPLERS, karras_sigmas
from diffusion_lab.diffusion.schedules import make_betas

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
ODE_VARIANTS: dict[str, tuple[str, dict]] = {
    "euler (= ddim)": ("euler", {}),
    "heun": ("heun", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "plms (prk warm-up)": ("plms", {}),
    "plms (ab warm-up)": ("plms", {"warmup": "ab"}),
    "lms order 4": ("lms", {}),
    "lms order 4 (rk4 warm-up)": ("lms", {"warmup": "rk4"}),
}
STEP_COUNTS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256]
OVERHEAD_OPTIONS = {"annealed_langevin": {"n_steps_each": 2}}


class CountingDenoiser:
    """Counts calls of a denoiser (used in untimed runs only)."""

    def __init__(self, denoiser: Callable) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


# ---------------------------------------------------------------------------------------------------
# 1. error vs NFE
# ---------------------------------------------------------------------------------------------------
def exact_ode_solution(model, x: torch.Tensor, steps: int, sigma_end: float = 1e-4) -> torch.Tensor:
    """RK4 on dx/du = x - D(x, e^u), u = log sigma, from SIGMA_MAX to ``sigma_end``, then D there (the
    remaining O(sigma_end^2 / var) shrinkage is far below every sampler's error)."""
    levels = torch.linspace(math.log(SIGMA_MAX), math.log(sigma_end), steps + 1, dtype=F64).tolist()

    def f(y, u):
        return y - model(y, torch.full((y.shape[0],), math.exp(u), dtype=F64))

    for u, v in zip(levels[:-1], levels[1:]):
        h = v - u
        k1 = f(x, u)
        k2 = f(x + h / 2 * k1, u + h / 2)
        k3 = f(x + h / 2 * k2, u + h / 2)
        k4 = f(x + h * k3, v)
        x = x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
    return model(x, torch.full((x.shape[0],), sigma_end, dtype=F64))


def error_vs_nfe(batch: int = 512) -> tuple[dict[str, list[tuple[int, float]]], float, float]:
    model = toy_mixture_2d()
    noise = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * SIGMA_MAX
    reference = exact_ode_solution(model, noise, 2000)
    reference_error = rms(reference - exact_ode_solution(model, noise, 1000))
    # Every sampler ends with x0 = D(x, sigma_min) (multistep ones extrapolate instead); even an exact x at
    # sigma_min leaves this error, O(sigma_min^2 / component variance).
    floor = rms(reference - exact_ode_solution(model, noise, 2000, sigma_end=SIGMA_MIN))
    curves: dict[str, list[tuple[int, float]]] = {}
    for label, (name, options) in ODE_VARIANTS.items():
        points = []
        for steps in STEP_COUNTS:
            counter = CountingDenoiser(model)
            out = SAMPLERS[name](counter, noise, karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX), **options)
            if counter.calls > 256:
                break
            points.append((counter.calls, rms(out - reference)))
        curves[label] = points
    return curves, reference_error, floor


def rms(difference: torch.Tensor) -> float:
    """Root mean square over the batch of the per-sample Euclidean norm."""
    return float(difference.norm(dim=1).pow(2).mean().sqrt())


def fitted_order(points: list[tuple[int, float]], lo: int = 24, hi: int = 256) -> float:
    """-slope of the least-squares line through log(error) vs log(NFE) for NFE in [lo, hi]."""
    pts = [(math.log(n), math.log(e)) for n, e in points if lo <= n <= hi and e > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return -sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def last_doubling_slope(points: list[tuple[int, float]]) -> float:
    """-slope between the measured point with the largest NFE and the one nearest half of it."""
    n_last, e_last = points[-1]
    n_half, e_half = min(points[:-1], key=lambda p: abs(math.log(p[0] / (n_last / 2))))
    return math.log(e_half / e_last) / math.log(n_last / n_half)


def plot(curves: dict[str, list[tuple[int, float]]], floor: float, path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in curves.items():
        ax.loglog([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=label)
    nfe = torch.tensor([8.0, 256.0])
    for order, style in ((1, ":"), (2, "--"), (4, "-.")):
        ax.loglog(nfe, 0.5 * (nfe / 8) ** -order, "k" + style, lw=0.8, alpha=0.5, label=f"slope -{order}")
    ax.axhline(floor, color="grey", lw=0.8, label="floor: exact ODE to 0.002, then D")
    ax.set_xlabel("NFE (denoiser evaluations)")
    ax.set_ylabel("RMS error to the exact PF-ODE solution")
    ax.set_title("ODE samplers on the analytic 2-D mixture (Karras grid, rho=7, [0.002, 80])")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# 2. overhead vs the bare network
# ---------------------------------------------------------------------------------------------------
def fastest(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up: the least-disturbed estimate of a deterministic
    workload's cost on a shared machine (as ``timeit`` recommends)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved(run: Callable[[], object], bare: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(fastest run, fastest bare), timed alternately so that both see the same load."""
    run(), bare()
    run_times, bare_times = [], []
    for _ in range(repeats):
        for fn, times in ((run, run_times), (bare, bare_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(run_times), min(bare_times)


def measure(run, run_null, bare, nfe: int, t_forward: float, repeats: int, null_repeats: int) -> dict:
    """Both estimates of wall / (NFE x bare forward) for one sampler.

    ``ratio_direct``: a full run against NFE bare forwards, timed alternately. ``ratio``: 1 + (the same run
    with a network that returns a cached output, i.e. the loop and adapter work alone) / (NFE x fastest
    bare forward). On a CPU the two parts run one after the other, so the second is the same quantity,
    measured without the forward's noise.
    """
    t_run, t_bare = interleaved(run, bare, repeats)
    t_loop = fastest(run_null, null_repeats)
    return {
        "nfe": nfe,
        "seconds": t_run,
        "ratio_direct": t_run / t_bare,
        "loop_ms": 1e3 * t_loop,
        "ratio": 1 + t_loop / (nfe * t_forward),
    }


def quickstart_unet() -> torch.nn.Module:
    from diffusion_lab.nets.unet import UNet

    return UNet(
        in_channels=1,
        resolution=8,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=2,
        attention_resolutions=(4,),
        dropout=0.0,
    ).eval()


def nfe_of(name: str, denoiser, x, sigmas, options) -> int:
    counter = CountingDenoiser(denoiser)
    SAMPLERS[name](counter, x, sigmas, generator=torch.Generator().manual_seed(0), **options)
    return counter.calls


def overhead_ours(denoiser, null_denoiser, forward, x, sigmas, t_forward, repeats, null_repeats) -> dict:
    rows = {}
    for name in SAMPLERS:
        options = OVERHEAD_OPTIONS.get(name, {})
        nfe = nfe_of(name, denoiser, x, sigmas, options)

        def run(net=denoiser, name=name, options=options):
            SAMPLERS[name](net, x, sigmas, generator=torch.Generator().manual_seed(0), **options)

        def bare(nfe=nfe):
            for _ in range(nfe):
                forward()

        rows[name] = measure(
            run, functools.partial(run, null_denoiser), bare, nfe, t_forward, repeats, null_repeats
        )
    return rows


def overhead_diffusers(unet, null_unet, betas, x_vp, steps, t_forward, repeats, null_repeats) -> dict | str:
    try:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    except ImportError:
        return "diffusers is not installed (`pip install 'diffusion_lab[bench]'`): column skipped."
    common = {"num_train_timesteps": len(betas), "trained_betas": betas.float().numpy()}
    schedulers = {
        "diffusers DDIMScheduler": DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True),
        "diffusers DPMSolverMultistepScheduler (2M)": DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2
        ),
    }
    rows = {}
    for label, scheduler in schedulers.items():
        scheduler.set_timesteps(steps)
        timesteps = [torch.full((x_vp.shape[0],), float(t)) for t in scheduler.timesteps]

        def run(net=unet, scheduler=scheduler, timesteps=timesteps):
            scheduler.set_timesteps(steps)
            x = x_vp
            for t, t_batch in zip(scheduler.timesteps, timesteps):
                x = scheduler.step(net(scheduler.scale_model_input(x, t), t_batch), t, x).prev_sample

        def bare(timesteps=timesteps):
            for t_batch in timesteps:
                unet(x_vp, t_batch)

        rows[label] = measure(
            run, functools.partial(run, null_unet), bare, len(timesteps), t_forward, repeats, null_repeats
        )
    return rows


def overhead(steps: int = 10, batch: int = 16, repeats: int = 5, null_repeats: int = 50) -> dict:
    # (a) UNet as a discrete 1000-step eps-model (c_noise = timestep), wrapped once as a VE denoiser
    unet = quickstart_unet()
    betas = make_betas("linear", 1000)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    denoiser = DiscreteEpsDenoiser(unet, alphas_cumprod)
    sigmas = denoiser.respaced_sigmas(steps)
    gen = torch.Generator().manual_seed(0)
    x_vp = torch.randn(batch, 1, 8, 8, generator=gen)
    x = x_vp * sigmas[0].float()
    t_fixed = torch.full((batch,), 500.0)
    cached_eps = unet(x_vp, t_fixed)

    def null_unet(x_in, t):
        return cached_eps

    null_denoiser = DiscreteEpsDenoiser(null_unet, alphas_cumprod)
    t_unet = fastest(lambda: unet(x_vp, t_fixed), 30)
    unet_rows = overhead_ours(
        denoiser, null_denoiser, lambda: unet(x_vp, t_fixed), x, sigmas, t_unet, repeats, null_repeats
    )
    diffusers_rows = overhead_diffusers(unet, null_unet, betas, x_vp, steps, t_unet, repeats, null_repeats)
    # (b) the analytic mixture denoiser on 2-D points
    mixture = toy_mixture_2d()
    x2 = torch.randn(batch, 2, generator=gen, dtype=F64) * SIGMA_MAX
    grid = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX)
    level = torch.full((batch,), 1.0, dtype=F64)
    cached_x0 = mixture(x2, level)
    t_mixture = fastest(lambda: mixture(x2, level), 300)
    analytic_rows = overhead_ours(
        mixture,
        lambda x_in, sigma, **cond: cached_x0,
        lambda: mixture(x2, level),
        x2,
        grid,
        t_mixture,
        20 * repeats,
        null_repeats,
    )
    return {
        "unet": unet_rows,
        "diffusers": diffusers_rows,
        "analytic": analytic_rows,
        "unet_forward_ms": 1e3 * t_unet,
        "mixture_forward_ms": 1e3 * t_mixture,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "steps": steps,
        "batch": batch,
        "repeats": repeats,
        "null_repeats": null_repeats,
    }


# ---------------------------------------------------------------------------------------------------
def report(curves, reference_error, floor, costs) -> tuple[str, dict]:
    budgets = [4, 8, 16, 32, 64, 128, 256]
    rows = []
    for label, points in curves.items():
        row: list[object] = [label]
        for budget in budgets:
            best = [e for n, e in points if n <= budget]
            row.append(float(best[-1]) if best else "-")
        row += [round(fitted_order(points), 2), round(last_doubling_slope(points), 2)]
        rows.append(row)
    accuracy = markdown_table(
        ["sampler"] + [f"NFE<={b}" for b in budgets] + ["slope NFE 24-256", "slope last doubling"], rows
    )

    def cost_table(table: dict) -> str:
        return markdown_table(
            ["sampler", "NFE", "wall (s)", "loop + adapter (ms)", "ratio", "ratio, direct"],
            [
                [k, v["nfe"], v["seconds"], v["loop_ms"], round(v["ratio"], 4), round(v["ratio_direct"], 3)]
                for k, v in table.items()
            ],
        )

    diffusers = costs["diffusers"]
    diffusers_md = diffusers if isinstance(diffusers, str) else cost_table(diffusers)
    ours_line = ", ".join(f"{k} {costs['unet'][k]['ratio']:.4f}" for k in ("ddim", "dpmpp_2m"))
    markdown = f"""# Samplers: accuracy vs NFE and overhead

Reproduce: `python -m benchmarks samplers` (about two minutes on 2 CPU cores; torch uses 1 thread).

## 1. Error to the exact probability-flow ODE solution vs NFE

Analytic 2-D class mixture (`toy_mixture_2d()`, 6 components, std 0.15), 512 starting points
`x = 80 randn`, Karras grid (rho = 7, sigma in [0.002, 80]) followed by 0. Error: RMS over points of
the distance to the exact ODE endpoint at sigma = 0 (RK4 in log-sigma, 2000 steps; its own error
against 1000 steps is {reference_error:.1e}). Each cell is the error at the largest measured NFE within
the budget; the slopes are -d log(error) / d log(NFE), fitted over NFE 24-256 and between the last two
doublings (about NFE 128 and 256). Floor: the exact ODE solution at sigma_min = 0.002 followed by the final
denoising step `x0 = D(x, 0.002)` that ends most samplers is already {floor:.1e} from the exact endpoint.

{accuracy}

![error vs NFE](samplers.png)

Reading: Heun and DPM-Solver++(2M) show their order 2 over the whole range, DPM-Solver++ at half the
evaluations per step. Euler/DDIM is still short of its asymptotic order 1 at 256 NFE on this sharp mixture
(components of std 0.15 separate over a few sigma-steps of the graded grid). PLMS's constant-step
Adams-Bashforth weights assume equal steps; on this graded grid its slope falls towards 2 over the last
doubling (4th order on a grid uniform in sigma: see the tests). LMS with exact variable-step weights keeps
a higher slope until it meets the floor. With very few steps the RK4 warm-ups and Heun take huge steps
into the low-noise region and are worse than the one-evaluation methods.

## 2. Sampler overhead vs the bare network

The ratio wall / (NFE x one bare forward) of a whole sampling run, {costs["steps"]} steps, batch
{costs["batch"]}. Two estimates of it:

* **ratio** = 1 + (loop + adapter) / (NFE x bare forward). "loop + adapter" is the same sampling run with a
  network that returns a cached output (fastest of {costs["null_repeats"]}): everything the sampler and the
  VE adapter do besides the network. On a CPU the two parts run one after the other, so this is the
  ratio without the forward's timing noise. The bare forward is the fastest of 30 (UNet) / 300 calls.
* **ratio, direct**: a full run against a loop of NFE bare forwards on the same inputs, timed alternately
  (fastest of {costs["repeats"]} / {20 * costs["repeats"]}). On this shared 2-core machine the network's
  own time varies by tens of percent between runs, which this column shows.

### (a) `diffusion_lab.nets.unet.UNet`, 8x8x1, channels 32-64 ({costs["unet_parameters"]:,} parameters)

Used as a discrete 1000-step eps-model (linear betas), our samplers drive it through `DiscreteEpsDenoiser`
(respaced "linspace" grid); the bare forward is `unet(x_vp, t)`, {costs["unet_forward_ms"]:.1f} ms.
The ratio therefore includes the adapter (timestep lookup, VP scaling) as well as the sampler loop.

{cost_table(costs["unet"])}

Side by side, diffusers' schedulers on the same network, same number of steps:

{diffusers_md}

Ours on the same network for comparison: {ours_line}.

### (b) Analytic mixture denoiser (2-D, float64; bare forward {costs["mixture_forward_ms"]:.3f} ms)

Here the "network" is a few tensor ops, so this is the worst case for relative overhead.

{cost_table(costs["analytic"])}
"""
    headline = {
        "overhead_ratio": {k: round(v["ratio"], 4) for k, v in costs["unet"].items()},
        "overhead_ratio_direct": {k: round(v["ratio_direct"], 4) for k, v in costs["unet"].items()},
        "overhead_ratio_analytic": {k: round(v["ratio"], 4) for k, v in costs["analytic"].items()},
        "overhead_ratio_diffusers": (
            {k: round(v["ratio"], 4) for k, v in diffusers.items()}
            if isinstance(diffusers, dict)
            else diffusers
        ),
        "fitted_order": {label: round(fitted_order(points), 3) for label, points in curves.items()},
        "last_doubling_order": {label: round(last_doubling_slope(p), 3) for label, p in curves.items()},
        "error_floor": floor,
        "error_vs_nfe": {label: [[n, e] for n, e in points] for label, points in curves.items()},
        "unet_forward_ms": round(costs["unet_forward_ms"], 3),
        "machine": machine_info(),
    }
    return markdown, headline


def main() -> None:
    torch.set_num_threads(1)
    with torch.inference_mode():
        print("error vs NFE on the analytic mixture ...")
        curves, reference_error, floor = error_vs_nfe()
        print("overhead vs the bare network ...")
        costs = overhead()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(curves, floor, RESULTS_DIR / "samplers.png")
    markdown, headline = report(curves, reference_error, floor, costs)
    path = write_results("samplers", markdown, headline)
    print(f"wrote {path}")
    for k, v in headline["overhead_ratio"].items():
        print(f"  overhead {k:18s} {v:.3f}")


if __name__ == "__main__":
    main()

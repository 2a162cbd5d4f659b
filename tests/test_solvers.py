import pytest
import torch

from llcm.schedules import Schedule, expand_like, prediction_to_x0_eps, x0_eps_to_target
from llcm.solvers import CALLS_PER_STEP, ORDER, SOLVERS, guided_target
from toy import denoiser, error_table

SCHED = Schedule.scaled_linear()


@pytest.fixture(scope="module")
def table():
    return error_table(SCHED)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_observed_order_matches_declared(table, name):
    errs, order = table[name]["errors"], table[name]["order"]
    assert abs(order - ORDER[name]) < 0.2, (name, errs)
    # and the error keeps falling once the step count is large enough to be asymptotic
    assert errs[-1] < errs[-2] < errs[-3]


def test_second_order_beats_first_order_at_equal_teacher_calls(table):
    # 16 midpoint steps (32 calls) vs 32 DDIM steps (32 calls)
    assert table["midpoint"]["errors"][-2] < table["ddim"]["errors"][-1] / 3
    assert table["dpmpp"]["errors"][-2] < table["ddim"]["errors"][-1] / 3


def test_paper_leapfrog_equals_ddim():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 4, 6, 6, generator=g)
    t = torch.randint(20, 999, (8,), generator=g).float()
    s = (t - 20).clamp(min=0)
    w = torch.randn(4, 4, 3, 3, generator=g) * 0.1

    def denoise(zz, tt):  # an arbitrary nonlinear "network"
        eps = torch.tanh(torch.nn.functional.conv2d(zz, w, padding=1)) + 0.01 * tt.view(-1, 1, 1, 1) / 999
        a, sg = (expand_like(v, zz) for v in SCHED.alpha_sigma(tt))
        return prediction_to_x0_eps(eps, zz, a, sg, "epsilon")

    a = SOLVERS["leapfrog"](denoise, z, t, s, SCHED)
    b = SOLVERS["ddim"](denoise, z, t, s, SCHED)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


class CountingDenoiser:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, z, t):
        self.calls += 1
        return self.fn(z, t)


def _lin_denoiser(weight):
    def denoise(z, t):
        eps = torch.tanh(z * weight) + 0.001 * t.view(-1, 1, 1, 1).to(z.dtype)
        a, s = (expand_like(v, z) for v in SCHED.alpha_sigma(t))
        return prediction_to_x0_eps(eps, z, a, s, "epsilon")
    return denoise


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_contract(name):
    solver = SOLVERS[name]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([999.0, 500.0, 39.0])
    s = torch.tensor([979.0, 480.0, 19.0])
    weight = torch.tensor(0.7, requires_grad=True)
    den = CountingDenoiser(_lin_denoiser(weight))
    out = solver(den, z, t, s, SCHED)
    # shapes, dtype, cost
    assert out.shape == z.shape and out.dtype == z.dtype
    assert den.calls == CALLS_PER_STEP[name]
    # gradients flow to the denoiser's parameters
    out.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)
    # determinism and no_grad
    with torch.no_grad():
        a = solver(den, z, t, s, SCHED)
        b = solver(den, z, t, s, SCHED)
    assert torch.equal(a, b) and not a.requires_grad
    assert torch.allclose(a, out.detach(), atol=1e-6)
    # s == t is the identity
    with torch.no_grad():
        same = solver(den, z, t, t.clone(), SCHED)
    assert torch.allclose(same, z, atol=1e-4), (same - z).abs().max()
    # float64 works too
    out64 = solver(_lin_denoiser(torch.tensor(0.7, dtype=torch.float64)), z.double(), t.double(), s.double(), SCHED)
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_is_exact_on_the_toy_within_one_fine_step(name):
    # a 20-step interval at t=499 on the Gaussian toy: every solver is close to the exact flow
    from toy import exact

    z = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t, s = torch.full((64,), 499.0, dtype=torch.float64), torch.full((64,), 479.0, dtype=torch.float64)
    out = SOLVERS[name](denoiser(SCHED), z, t, s, SCHED)
    ref = exact(SCHED, z, t.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1))
    assert (out - ref).abs().max() < 1e-3


def test_guided_target_first_order_equals_cfg_on_predictions():
    # eq. 14 with DDIM == one DDIM step on CFG-combined (x0, eps), as diffusers' LCM distillation computes it
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 4, 5, 5, generator=g)
    t = torch.tensor([999.0, 759.0, 259.0, 19.0])
    s = (t - 20).clamp(min=0)
    w = torch.tensor([5.0, 7.5, 10.0, 15.0])
    shift = torch.randn(4, 4, 5, 5, generator=g)

    def pair(zz, tt):  # first half conditioned, second half unconditional
        cond = torch.cat([shift, torch.zeros_like(shift)])
        eps = torch.tanh(zz + cond)
        a, sg = (expand_like(v, zz) for v in SCHED.alpha_sigma(tt))
        return prediction_to_x0_eps(eps, zz, a, sg, "epsilon")

    target = guided_target(SOLVERS["ddim"], pair, z, t, s, w, SCHED)
    x0_both, eps_both = pair(torch.cat([z, z]), torch.cat([t, t]))
    (x0c, x0u), (epsc, epsu) = x0_both.chunk(2), eps_both.chunk(2)
    ww = w.view(-1, 1, 1, 1)
    x0 = x0c + ww * (x0c - x0u)
    eps = epsc + ww * (epsc - epsu)
    a, sg = (expand_like(v, z) for v in SCHED.alpha_sigma(s))
    assert torch.allclose(target, a * x0 + sg * eps, rtol=1e-5, atol=1e-4)
    # w = 0 is the plain conditional solve
    t0 = guided_target(SOLVERS["midpoint"], pair, z, t, s, torch.zeros(4), SCHED)
    cond_only = SOLVERS["midpoint"](lambda zz, tt: tuple(v[:4] for v in pair(torch.cat([zz, zz]), torch.cat([tt, tt]))),
                                    z, t, s, SCHED)
    assert torch.allclose(t0, cond_only, atol=1e-5)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_parameterizations_round_trip(ptype):
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([100.0, 900.0])
    a, s = (expand_like(v, x0) for v in SCHED.alpha_sigma(t))
    z = a * x0 + s * eps
    pred = x0_eps_to_target(x0, eps, a, s, ptype)
    x0b, epsb = prediction_to_x0_eps(pred, z, a, s, ptype)
    assert torch.allclose(x0b, x0, atol=1e-4) and torch.allclose(epsb, eps, atol=1e-4)


def test_schedule_matches_diffusers_tables():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    a, s = SCHED.alpha_sigma(torch.arange(1000))
    assert torch.allclose((a**2).float(), ref, rtol=1e-5)
    assert torch.allclose(a**2 + s**2, torch.ones(1000, dtype=torch.float64))
    t = torch.tensor([0.0, 0.5, 19.0, 512.25, 999.0], dtype=torch.float64)
    assert torch.allclose(SCHED.t_of_lam(SCHED.lam(t)), t, atol=1e-9)
    assert SCHED.skipping_grid(20).tolist() == list(range(19, 1000, 20))
    with pytest.raises(ValueError):
        SCHED.skipping_grid(2000)

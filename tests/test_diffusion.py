"""The diffusion toolkit against closed forms (schedules, forward process, DDPM/DDIM steps,
embeddings, label encodings), in 2D and 3D."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semidiff_nnunet.diffusion import (
    ContinuousScheduler,
    DiffusionScheduler,
    TimestepEmbedding,
    asymmetric_time_pairs,
    continuous_gamma,
    cosine_beta_schedule,
    ddim_step,
    ddpm_posterior,
    eps_from_v,
    eps_from_x0,
    get_beta_schedule,
    get_timestep_embedding,
    labels_to_onehot,
    labels_to_signed,
    linear_beta_schedule,
    log_snr_to_alpha_sigma,
    predictions_to_x0_eps,
    q_sample,
    sigmoid_beta_schedule,
    signed_to_labels,
    signed_to_onehot_probs,
    spaced_timesteps,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)

# (B, C, *spatial)
SHAPES = {"2d": (3, 2, 5, 6), "3d": (2, 3, 4, 5, 3)}
ndims = pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
PRED_TYPES = ("epsilon", "sample", "v_prediction")


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, tol=1e-10):
    return torch.allclose(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------- schedules
def test_linear_schedule_matches_ddpm():
    betas = linear_beta_schedule(1000)
    assert betas.shape == (1000,)
    for t in (0, 10, 500, 999):
        assert betas[t].item() == pytest.approx(1e-4 + t * (0.02 - 1e-4) / 999, rel=1e-12)
    ab = DiffusionScheduler(1000, "linear").alphas_cumprod
    for t in (0, 10, 500):
        expected = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(t + 1))
        assert ab[t].item() == pytest.approx(expected, rel=1e-10)
    # rescaled by 1000/T for other T (guided-diffusion / lucidrains)
    b100 = linear_beta_schedule(100)
    assert (b100[0].item(), b100[-1].item()) == (pytest.approx(1e-3), pytest.approx(0.2))


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_alpha_bar_closed_form(T):
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = DiffusionScheduler(T, "cosine").alphas_cumprod
    for t in sorted({0, 1, T // 2, T - 2}):
        assert ab[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-10), t
    # the last step hits max_beta = 0.999 (f(1) = 0): ᾱ_{T-1} = 0.001 ᾱ_{T-2}
    betas = cosine_beta_schedule(T)
    assert betas[-1].item() == pytest.approx(0.999)
    assert ab[-1].item() == pytest.approx(0.001 * ab[-2].item(), rel=1e-10)


def test_sigmoid_alpha_bar_closed_form():
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    f = lambda u: (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))  # start=-3, end=3, tau=1  # noqa: E731
    T = 1000
    ab = DiffusionScheduler(T, "sigmoid").alphas_cumprod
    for t in (0, 250, 900, 998):
        assert ab[t].item() == pytest.approx(f((t + 1) / T), rel=1e-9), t
    assert ab[499].item() == pytest.approx(0.5, rel=1e-12)  # symmetric sigmoid: ᾱ(1/2) = 1/2
    assert sigmoid_beta_schedule(T)[-1].item() == pytest.approx(0.999)  # ᾱ(1) = 0 → capped β


def test_continuous_gamma_closed_form():
    ns, ds = 0.0002, 0.00025
    for t in (0.1, 0.5, 0.9, 1.0):
        expected = math.cos((t + ns) / (1 + ds) * math.pi / 2) ** 2
        assert continuous_gamma(t, "cosine").item() == pytest.approx(expected, rel=1e-6), t
    # DDP clamps cos⁻² − 1 at 1e-5, so γ(0) = 1/(1 + 1e-5) rather than 1 − 1e-7
    assert continuous_gamma(0.0, "cosine").item() == pytest.approx(1 / (1 + 1e-5), rel=1e-12)
    for t in (0.0, 0.3, 0.7):
        assert continuous_gamma(t, "linear").item() == pytest.approx(math.exp(-1e-4 - 10 * t * t), rel=1e-9)
    alpha, sigma = log_snr_to_alpha_sigma(torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64))
    assert close(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    assert alpha[1].item() == pytest.approx(math.sqrt(0.5))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="cosine"):
        get_beta_schedule("cosin", 10)
    with pytest.raises(ValueError, match="prediction"):
        DiffusionScheduler(10, "cosine", prediction_type="x_1")
    with pytest.raises(ValueError, match="linear"):
        ContinuousScheduler("sigmoid")


# -------------------------------------------------------------------------------- forward process
@ndims
@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_q_sample_mean_and_variance(shape, kind):
    n = 2000
    x0_one = 2 * torch.sign(randn(*shape[1:], seed=1)) + randn(*shape[1:], seed=2) * 0.3
    x0 = x0_one.expand(2 * n, *shape[1:]).float()
    if kind == "discrete":
        sched = DiffusionScheduler(1000, "linear")
        t = torch.tensor([100, 600]).repeat(n)
    else:
        sched = ContinuousScheduler("cosine")
        t = torch.tensor([0.2, 0.7]).repeat(n)
    xt = sched.q_sample(x0, t, generator=torch.Generator().manual_seed(3)).double()
    for g in (0, 1):
        ab = sched.alpha_bar(t[g]).item()
        xg, x0g = xt[g::2], x0[g::2].double()
        # E[x_t] = sqrt(ᾱ) x0 elementwise, the regression slope on x0 = sqrt(ᾱ), Var = 1 − ᾱ
        tol = 5 * math.sqrt((1 - ab) / n)
        assert (xg.mean(0) - math.sqrt(ab) * x0_one).abs().max() < tol
        slope = (xg * x0g).sum() / (x0g * x0g).sum()
        assert slope.item() == pytest.approx(math.sqrt(ab), abs=0.01)
        assert xg.var(0).mean().item() == pytest.approx(1 - ab, rel=0.03)


@ndims
def test_prediction_conversions_round_trip(shape):
    x0, eps = randn(*shape, seed=0), randn(*shape, seed=1)
    ab = torch.linspace(0.05, 0.95, shape[0], dtype=torch.float64)  # one ᾱ per sample
    xt = q_sample(x0, ab, eps)
    a = ab.view(-1, *[1] * (len(shape) - 1))
    assert close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert close(eps_from_x0(xt, x0, ab), eps)  # the ε implied by x_t
    assert close(x0_from_eps(xt, eps_from_x0(xt, x0, ab), ab), x0)  # x0 → ε → x0
    v = v_from_x0_eps(x0, eps, ab)
    assert close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)  # Salimans & Ho: v = α ε − σ x
    assert close(x0_from_v(xt, v, ab), x0)  # x0 → v → x0
    assert close(eps_from_v(xt, v, ab), eps)
    for kind, out in zip(PRED_TYPES, (eps, x0, v), strict=True):
        px0, peps = predictions_to_x0_eps(out, xt, ab, kind)
        assert close(px0, x0) and close(peps, eps), kind


# --------------------------------------------------------------------------------------- DDIM / DDPM
@ndims
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_ddim_step_with_exact_prediction_returns_exact_earlier_sample(shape, prediction_type):
    sched = DiffusionScheduler(1000, "cosine", prediction_type=prediction_type)
    ts = sched.set_timesteps(10)
    assert ts.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    x0, eps = randn(*shape, seed=0), randn(*shape, seed=1)
    ab = sched.alphas_cumprod
    # one shared t, then a different t per sample
    cases = [(torch.tensor(777), torch.tensor(666)), (ts[[1, 4, 7][: shape[0]]], ts[[2, 5, 8][: shape[0]]])]
    for t, t_prev in cases:
        xt = sched.add_noise(x0, eps, t)
        out = sched.step(sched.training_target(x0, eps, t), t, xt)
        a_prev = ab[t_prev].view(-1, *[1] * (len(shape) - 1))
        assert close(out.prev_sample, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, 1e-8)
        assert close(out.pred_x0, x0, 1e-8)
    # the last step (t=0 → clean data) returns x0 itself
    xt = sched.add_noise(x0, eps, 0)
    assert close(sched.step(sched.training_target(x0, eps, 0), 0, xt).prev_sample, x0, 1e-8)


@ndims
def test_continuous_ddim_step_exact_and_asymmetric_grid(shape):
    sched = ContinuousScheduler("cosine", prediction_type="sample")
    pairs = sched.set_timesteps(4, t_diff=1)  # ProtoDiff Algorithm 2 with t_diff = 1
    assert close(pairs, torch.tensor([[1, 0.5], [0.75, 0.25], [0.5, 0.0], [0.25, 0.0]], dtype=torch.float64))
    x0, eps = randn(*shape, seed=0), randn(*shape, seed=1)
    for t_now, t_next in pairs.tolist():
        xt = sched.add_noise(x0, eps, t_now)
        out = sched.step(x0, t_now, xt)  # t_next looked up from time_pairs
        g = continuous_gamma(t_next).item()
        assert close(out.prev_sample, math.sqrt(g) * x0 + math.sqrt(1 - g) * eps, 1e-7), (t_now, t_next)


def test_time_grids():
    assert spaced_timesteps(10, 2).tolist() == [9, 0]  # DiffRect: space_timesteps(10, [2])
    assert spaced_timesteps(1000, 4).tolist() == [999, 666, 333, 0]
    sym = asymmetric_time_pairs(4, t_diff=0)
    assert close(sym, torch.tensor([[1, 0.75], [0.75, 0.5], [0.5, 0.25], [0.25, 0.0]], dtype=torch.float64))
    sched = DiffusionScheduler(1000, "linear")
    assert sched.set_timesteps(5).tolist() == [999, 749, 500, 250, 0]
    assert sched.prev_timesteps.tolist() == [749, 500, 250, 0, -1]
    sched.set_timesteps(5, t_diff=1)
    assert sched.prev_timesteps.tolist() == [500, 250, 0, -1, -1]
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.prev_timestep(998)


def test_discrete_asymmetric_step_lands_on_shifted_timestep():
    sched = DiffusionScheduler(1000, "linear", prediction_type="epsilon")
    sched.set_timesteps(5, t_diff=1)
    x0, eps = randn(2, 1, 4, 4, seed=0), randn(2, 1, 4, 4, seed=1)
    out = sched.step(eps, 749, sched.add_noise(x0, eps, 749))
    assert close(out.prev_sample, sched.add_noise(x0, eps, 250), 1e-8)
    assert not close(out.prev_sample, sched.add_noise(x0, eps, 500), 1e-3)


def _sample_loop(sched, x_T, generator, eta=None):
    x = x_T
    for t in sched.timesteps.tolist():
        model_output = 0.9 * torch.tanh(x) + 0.01 * t  # a fixed stand-in for a network
        x = sched.step(model_output, t, x, eta=eta, generator=generator).prev_sample
    return x


@ndims
def test_ddim_eta0_is_deterministic(shape):
    # DiffRect's latent sampler: T=10 cosine, x0 prediction, clip, DDIM η=0 over steps [9, 0]
    sched = DiffusionScheduler(10, "cosine", prediction_type="sample", clip_sample=True)
    assert sched.set_timesteps(2).tolist() == [9, 0]
    x_T = randn(*shape, seed=5, dtype=torch.float32)
    a = _sample_loop(sched, x_T, torch.Generator().manual_seed(1))
    b = _sample_loop(sched, x_T, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0  # clipped x0 at the final step
    # η > 0 does draw from the generator: different seeds, different samples
    sched.set_timesteps(5)
    c = _sample_loop(sched, x_T, torch.Generator().manual_seed(1), eta=1.0)
    d = _sample_loop(sched, x_T, torch.Generator().manual_seed(2), eta=1.0)
    assert not torch.allclose(c, d)


@ndims
def test_ddpm_posterior_closed_form(shape):
    sched = DiffusionScheduler(1000, "linear", prediction_type="sample", sampler="ddpm")
    betas, ab = sched.betas, sched.alphas_cumprod
    x0, xt, z = randn(*shape, seed=0), randn(*shape, seed=1), randn(*shape, seed=2)
    t = torch.tensor([5, 500, 999][: shape[0]])
    mean, var = sched.posterior(x0, xt, t)
    view = lambda c: c.view(-1, *[1] * (len(shape) - 1))  # noqa: E731
    b, a, a_prev = view(betas[t]), view(ab[t]), view(ab[t - 1])
    # DDPM eq. 7
    assert close(mean, b * a_prev.sqrt() / (1 - a) * x0 + (1 - a_prev) * (1 - b).sqrt() / (1 - a) * xt)
    assert close(var, b * (1 - a_prev) / (1 - a))
    # ancestral step: mean + sqrt(β̃) z ("fixed_small"), mean + sqrt(β) z ("fixed_large")
    assert close(sched.step(x0, t, xt, noise=z).prev_sample, mean + var.sqrt() * z)
    sched.variance_type = "fixed_large"
    assert close(sched.step(x0, t, xt, noise=z).prev_sample, mean + b.sqrt() * z)
    # the last step adds no noise and returns x0 (posterior mean at ᾱ_prev = 1)
    assert close(sched.step(x0, 0, xt, noise=z).prev_sample, x0)


@ndims
def test_ddim_eta1_equals_ddpm_posterior(shape):
    # Song et al.: DDIM with η = 1 is the DDPM posterior, also across a spaced step (t → t')
    x0, xt, z = randn(*shape, seed=0), randn(*shape, seed=1), randn(*shape, seed=2)
    ab = DiffusionScheduler(1000, "cosine").alphas_cumprod
    ab_t, ab_prev = ab[700], ab[300]
    eps = eps_from_x0(xt, x0, ab_t)
    mean, var = ddpm_posterior(x0, xt, ab_t, ab_prev)
    assert close(ddim_step(xt, x0, eps, ab_t, ab_prev, eta=1.0, noise=z), mean + var.sqrt() * z, 1e-9)
    assert not close(ddim_step(xt, x0, eps, ab_t, ab_prev, eta=0.0), mean, 1e-3)


def test_clip_sample_clamps_x0_and_recomputes_eps():
    sched = DiffusionScheduler(10, "cosine", prediction_type="sample", clip_sample=True)
    sched.set_timesteps(2)
    x = randn(2, 3, 4, 4, seed=0)
    pred = torch.full_like(x, 3.0)
    assert torch.equal(sched.step(pred, 0, x).prev_sample, torch.ones_like(x))
    ab0, ab9 = sched.alphas_cumprod[0], sched.alphas_cumprod[9]
    expected = ab0.sqrt() + (1 - ab0).sqrt() * (x - ab9.sqrt()) / (1 - ab9).sqrt()
    assert close(sched.step(pred, 9, x).prev_sample, expected)
    sched.clip_sample = False
    assert torch.equal(sched.step(pred, 0, x).prev_sample, pred)
    # ε prediction: x̂0 is clipped, then ε̂ is recomputed from it (guided-diffusion clip_denoised + DDIM)
    sched = DiffusionScheduler(10, "cosine", prediction_type="epsilon", clip_sample=True)
    sched.set_timesteps(2)
    eps_out = randn(2, 3, 4, 4, seed=1)
    x0c = ((x - (1 - ab9).sqrt() * eps_out) / ab9.sqrt()).clamp(-1, 1)
    assert (x0c.abs() == 1).any()  # the clip is active
    expected = ab0.sqrt() * x0c + (1 - ab0).sqrt() * (x - ab9.sqrt() * x0c) / (1 - ab9).sqrt()
    assert close(sched.step(eps_out, 9, x).prev_sample, expected)


# -------------------------------------------------------------------------------------- embedding
def test_timestep_embedding_values():
    t = torch.tensor([0, 3, 250])
    emb = get_timestep_embedding(t, 16)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :8], torch.zeros(8)) and torch.equal(emb[0, 8:], torch.ones(8))  # sin 0, cos 1
    for row, tv in ((1, 3.0), (2, 250.0)):
        for k in range(8):
            w = 10000 ** (-k / 7)  # ω_k = 10000^(−k/(h−1)), h = 8 (DDPM)
            assert emb[row, k].item() == pytest.approx(math.sin(tv * w), abs=1e-5)
            assert emb[row, 8 + k].item() == pytest.approx(math.cos(tv * w), abs=1e-5)
    # float t (DiffRect feeds (1 − Dice)·999), odd dim padded with a zero column
    odd = get_timestep_embedding(torch.tensor([0.5, 12.25]), 9)
    assert odd.shape == (2, 9) and torch.equal(odd[:, -1], torch.zeros(2))
    assert odd[0, 0].item() == pytest.approx(math.sin(0.5)) and odd[1, 7].item() == pytest.approx(
        math.cos(12.25e-4)
    )


def test_timestep_embedding_mlp():
    torch.manual_seed(0)
    mlp = TimestepEmbedding(16, 32)  # Linear(16, 32) → SiLU → Linear(32, 32)
    assert mlp.linear_1.weight.shape == (32, 16) and mlp.linear_2.weight.shape == (32, 32)
    t = torch.tensor([0.0, 4.0, 9.0])
    out = mlp(t)
    e = get_timestep_embedding(t, 16)
    expected = F.linear(
        F.silu(F.linear(e, mlp.linear_1.weight, mlp.linear_1.bias)), mlp.linear_2.weight, mlp.linear_2.bias
    )
    assert out.shape == (3, 32) and torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert mlp.linear_1.weight.grad.abs().sum() > 0
    gelu = TimestepEmbedding(16, 32, out_dim=8, act=nn.GELU)
    assert gelu(t).shape == (3, 8) and isinstance(gelu.act, nn.GELU)


# ----------------------------------------------------------------------------------------- labels
@ndims
def test_label_round_trip(shape):
    B, C, *spatial = shape
    C = C + 2  # at least 4 classes
    labels = torch.randint(0, C, (B, *spatial), generator=torch.Generator().manual_seed(0))
    onehot = labels_to_onehot(labels, C)
    assert onehot.shape == (B, C, *spatial)
    assert torch.equal(onehot.argmax(1), labels) and torch.equal(onehot.sum(1), torch.ones(B, *spatial))
    scale = 0.1
    signed = labels_to_signed(labels, C, scale=scale)
    assert torch.equal(signed.gather(1, labels.unsqueeze(1)).squeeze(1), torch.full((B, *spatial), scale))
    assert torch.allclose(signed.sum(1), torch.full((B, *spatial), (2 - C) * scale))  # others are −scale
    assert torch.equal(signed_to_labels(signed), labels)
    assert torch.allclose(signed_to_onehot_probs(signed, scale), onehot)
    noisy = signed + 0.9 * scale * (
        2 * torch.rand(signed.shape, generator=torch.Generator().manual_seed(1)) - 1
    )
    assert torch.equal(signed_to_labels(noisy), labels)


def test_labels_ignore_index_and_range():
    labels = torch.tensor([[0, 2, 255], [1, 255, 0]])
    onehot = labels_to_onehot(labels, 3, ignore_index=255)
    assert torch.equal(onehot[:, :, 2][0], torch.zeros(3)) and torch.equal(onehot[1, :, 1], torch.zeros(3))
    assert torch.equal(onehot[0, :, 1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(labels_to_signed(labels, 3, 2.0, ignore_index=255)[0, :, 2], torch.full((3,), -2.0))
    with pytest.raises(ValueError, match="labels must lie"):
        labels_to_onehot(torch.tensor([[0, 3]]), 3)

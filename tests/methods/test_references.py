"""Every weighting method against an independent reference on identical inputs.

The reference is LibMTL 1.1.5 where it has the method (UW, DWA, RLW, PCGrad, CAGrad, MGDA,
IMTL), else the paper's own definition (FAMO's objective, Nash-MTL's bargaining condition,
IMTL-G's closed form) computed here with autograd or numpy. Conventions: our weights act on
the raw losses and, for EW and DWA, sum to 1 where LibMTL's sum to T; a gradient method's
combined gradient is ``weights @ J``.
"""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mtl.methods import METHODS, build_method
from mtl.methods.base import StepInputs, seeded
from mtl.methods.cagrad import CAGrad
from mtl.methods.dwa import DynamicWeightAverage
from mtl.methods.ew import EqualWeighting
from mtl.methods.famo import EPS, FAMO
from mtl.methods.imtl_g import IMTLG
from mtl.methods.mgda_ub import MGDAUB
from mtl.methods.nash_mtl import NashMTL
from mtl.methods.pcgrad import PCGrad
from mtl.methods.rlw import RandomWeighting
from mtl.methods.uw import S_INIT, UncertaintyWeighting, log_variance_grad


def jacobian(seed: int, tasks: int, dim: int = 24, decades: float = 0.0) -> torch.Tensor:
    """Random per-task gradients (float64), task 1 conflicting with task 0; row norms spread
    over ``decades`` powers of ten."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(tasks, dim, generator=g, dtype=torch.float64)
    J[1] = -0.6 * J[0] + 0.4 * J[1]
    return J * 10 ** (decades * torch.rand(tasks, 1, generator=g, dtype=torch.float64))


def gram_inputs(J: torch.Tensor, step: int = 0) -> StepInputs:
    return StepInputs(torch.ones(J.shape[0], dtype=J.dtype), J @ J.T, step, 0)


def loss_inputs(losses: torch.Tensor, step: int = 0, epoch: int = 0) -> StepInputs:
    return StepInputs(losses, None, step, epoch)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# -- loss-based methods ----------------------------------------------------------------------


def test_ew_is_uniform():
    """EW: every weight is exactly 1/T (no tolerance: a constant)."""
    weights = EqualWeighting(5).weights(loss_inputs(torch.rand(5)))
    assert torch.equal(weights, torch.full((5,), 0.2))


def test_uw_weights_and_log_variance_gradient_equal_libmtl_autograd(libmtl):
    """UW vs LibMTL's UW (loss_scale an nn.Parameter, loss Σ L/(2e^s) + s/2, autograd):
    weights and ∂/∂s within 1e-6 (LibMTL computes in float32), then three steps of our Adam
    vs torch Adam on LibMTL's parameter at the same lr within 1e-6."""
    T, lr = 4, 0.05
    ours = UncertaintyWeighting(T, lr_scale=1.0)
    ref = libmtl.weighting("UW", T)
    ref.init_param()
    adam = torch.optim.Adam([ref.loss_scale], lr=lr)
    torch.testing.assert_close(ref.loss_scale.detach(), torch.full((T,), S_INIT))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        losses = torch.rand(T, generator=g) * 3
        adam.zero_grad()
        ref_weights = ref.backward(losses)
        mine = ours.weights(loss_inputs(losses, step))
        np.testing.assert_allclose(mine.numpy(), ref_weights, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            log_variance_grad(ours.log_var.detach(), losses),
            ref.loss_scale.grad,
            rtol=0,
            atol=1e-6,
        )
        ours.end_step(losses, lr, None)
        adam.step()
        torch.testing.assert_close(
            ours.log_var.detach(), ref.loss_scale.detach(), rtol=0, atol=1e-6
        )


def test_dwa_equals_libmtl_over_four_epochs(libmtl):
    """DWA vs LibMTL's DWA given the same epoch-mean losses: ours × T equals LibMTL's
    weights (they sum to T) within 1e-6 (float32 softmax) in every epoch, uniform in the
    first two."""
    T, steps = 3, 4
    ours = DynamicWeightAverage(T, temperature=2.0)
    ref = libmtl.weighting("DWA", T)
    g = torch.Generator().manual_seed(1)
    history = np.zeros((T, 4))
    for epoch in range(4):
        step_losses = []
        for s in range(steps):
            losses = torch.rand(T, generator=g) + 1.0 / (epoch + 1)
            mine = ours.weights(loss_inputs(losses, epoch * steps + s, epoch))
            ref.epoch, ref.train_loss_buffer = epoch, history
            theirs = ref.backward(losses.clone().requires_grad_(), T=2.0)
            np.testing.assert_allclose(T * mine.numpy(), theirs, rtol=0, atol=1e-6)
            ours.end_step(losses, 0.1, None)
            step_losses.append(losses.numpy())
        history[:, epoch] = np.mean(step_losses, axis=0)
    assert not np.allclose(theirs, 1.0)  # the later epochs did reweigh


def test_rlw_is_a_seeded_softmax_of_a_standard_normal_draw(libmtl):
    """RLW: w = softmax(z), z ~ N(0, I) from the (seed, step) generator, exactly (1e-7); the
    same (seed, step) gives the same weights, other steps others. LibMTL's RLW (Normal) under
    the same global seed gives softmax of torch.randn's draw: the same family (1e-7)."""
    T = 5
    method = RandomWeighting(T, seed=3)
    losses = torch.ones(T)
    w = [method.weights(loss_inputs(losses, step)) for step in range(3)]
    for step in range(3):
        expected = torch.softmax(torch.randn(T, generator=seeded(3, step)), dim=0)
        torch.testing.assert_close(w[step], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(RandomWeighting(T, seed=3).weights(loss_inputs(losses, 1)), w[1])
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    ref = libmtl.weighting("RLW", T)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        theirs = ref.backward(losses.clone().requires_grad_(), dist="Normal")
        torch.manual_seed(11)
        draw = torch.randn(T)
    np.testing.assert_allclose(theirs, torch.softmax(draw, 0).numpy(), rtol=0, atol=1e-7)


def test_famo_weights_are_the_gradient_of_its_objective():
    """FAMO: the weights equal ∂/∂L of Σ_k z_k log(L_k + ε) / c (c = Σ z_k / (L_k + ε),
    detached), the paper's objective, by autograd, within 1e-6 (float32)."""
    T = 4
    method = FAMO(T)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    losses = torch.tensor([0.5, 2.0, 0.05, 1.3], requires_grad=True)
    z = torch.softmax(method.logits.detach(), 0)
    c = (z / (losses + EPS)).sum().detach()
    (grad,) = torch.autograd.grad((z * torch.log(losses + EPS) / c).sum(), losses)
    weights = method.weights(loss_inputs(losses.detach()))
    torch.testing.assert_close(weights, grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("update", ["same_batch", "next_batch"])
def test_famo_logits_follow_the_papers_update(update):
    """FAMO's logits vs autograd of softmax(ξ)·δ, δ = log L_before - log L_after, then torch
    Adam(lr, weight_decay=γ): within 1e-6 over four steps. same_batch: "after" is the batch
    re-evaluated after the step; next_batch: the next weights() call's losses."""
    T, lr, gamma = 3, 0.025, 1e-3
    method = FAMO(T, lr=lr, gamma=gamma, update=update)
    xi = torch.zeros(T, requires_grad=True)
    adam = torch.optim.Adam([xi], lr=lr, weight_decay=gamma)

    def reference_update(before, after):
        delta = torch.log(before + EPS) - torch.log(after + EPS)
        (xi.grad,) = torch.autograd.grad(torch.softmax(xi, 0) @ delta, xi)
        adam.step()

    g = torch.Generator().manual_seed(2)
    batches = [torch.rand(T, generator=g) * 2 + 0.1 for _ in range(5)]
    afters = [b * (0.5 + torch.rand(T, generator=g)) for b in batches]
    for step, losses in enumerate(batches):
        weights = method.weights(loss_inputs(losses, step))
        if update == "next_batch" and step > 0:
            reference_update(batches[step - 1], losses)  # the last step's progress
        z = torch.softmax(xi.detach(), 0)
        torch.testing.assert_close(weights, (z / (losses + EPS)) / (z / (losses + EPS)).sum())
        method.end_step(losses, 0.1, afters[step] if update == "same_batch" else None)
        if update == "same_batch":
            reference_update(losses, afters[step])
        torch.testing.assert_close(method.logits.detach(), xi.detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(xi.detach(), torch.zeros(T))


# -- gradient methods ------------------------------------------------------------------------


def pcgrad_algorithm_1(J: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """Yu et al. 2020, Algorithm 1 in numpy: g_i^PC projected off every g_j (j ≠ i, in
    ``orders[i]``) it conflicts with; the update is Σ_i g_i^PC."""
    out = []
    for i, order in enumerate(orders):
        g = J[i].copy()
        for j in order:
            if j != i and g @ J[j] < 0:
                g -= (g @ J[j]) / (J[j] @ J[j]) * J[j]
        out.append(g)
    return np.sum(out, axis=0)


def recorded_orders(monkeypatch) -> list[list[int]]:
    """Records the permutations torch.randperm gives (TorchJD's PCGrad draws one per task)."""
    orders: list[list[int]] = []
    real = torch.randperm

    def spy(*args, **kwargs):
        perm = real(*args, **kwargs)
        orders.append(perm.tolist())
        return perm

    monkeypatch.setattr(torch, "randperm", spy)
    return orders


def replayer(orders: list[list[int]]):
    """A ``random.shuffle`` that puts each list in the next recorded order."""
    replay = iter(orders)

    def shuffle(items: list) -> None:
        items[:] = next(replay)

    return shuffle


def test_pcgrad_two_tasks_equals_libmtl(libmtl):
    """PCGrad, T=2 (the order does not matter): combined gradient vs LibMTL's (the sum of
    its projected gradients) within 1e-5 relative (LibMTL's float32)."""
    worst = 0.0
    for seed in range(5):
        J = jacobian(seed, 2)
        _, theirs = libmtl.on_jacobian("PCGrad", J)
        ours = PCGrad(seed=0).weights(gram_inputs(J)) @ J
        worst = max(worst, max_rel(ours, theirs))
    assert worst < 1e-5, worst


def test_pcgrad_four_tasks_equals_libmtl_and_algorithm_1_in_the_same_order(libmtl, monkeypatch):
    """PCGrad, T=4: our order (torch.randperm under the (seed, step) seed) is recorded and
    handed to LibMTL's random.shuffle and to a numpy Algorithm 1; combined gradients agree
    within 1e-5 relative (LibMTL's float32) and 1e-9 (numpy, float64)."""
    module = libmtl.module("PCGrad")
    worst_libmtl = worst_numpy = 0.0
    for seed in range(6):
        J = jacobian(seed, 4)
        orders = recorded_orders(monkeypatch)
        ours = PCGrad(seed=5).weights(gram_inputs(J, step=seed)) @ J
        monkeypatch.undo()
        assert len(orders) == 4
        shuffle = types.SimpleNamespace(shuffle=replayer(orders))
        monkeypatch.setattr(module, "random", shuffle)
        _, theirs = libmtl.on_jacobian("PCGrad", J)
        monkeypatch.setattr(module, "random", random)
        reference = torch.from_numpy(pcgrad_algorithm_1(J.numpy(), orders))
        worst_libmtl = max(worst_libmtl, max_rel(ours, theirs))
        worst_numpy = max(worst_numpy, max_rel(ours, reference))
    assert worst_libmtl < 1e-5 and worst_numpy < 1e-9, (worst_libmtl, worst_numpy)


def test_pcgrad_order_is_seeded_and_leaves_the_global_generator_alone():
    """Same (seed, step) -> the same weights, exactly; torch's global RNG state untouched."""
    J = jacobian(0, 5)
    state = torch.random.get_rng_state()
    a = PCGrad(seed=1).weights(gram_inputs(J, step=7))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, PCGrad(seed=1).weights(gram_inputs(J, step=7)))


def cagrad_reference(J: torch.Tensor, c: float) -> torch.Tensor:
    """Liu et al. 2021, Algorithm 1 for any T, solved like the official code (scipy SLSQP on
    the dual, here at ftol 1e-12): g = g₀ + (c ‖g₀‖ / ‖g_w‖) g_w, without rescaling."""
    G = (J @ J.T).numpy()
    T = G.shape[0]
    b = np.full(T, 1.0 / T)
    radius = c * np.sqrt(b @ G @ b)
    res = minimize(
        lambda x: x @ G @ b + radius * np.sqrt(x @ G @ x + 1e-12),
        b,
        bounds=[(0, 1)] * T,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    gw = torch.from_numpy(res.x) @ J
    return J.mean(0) + radius / gw.norm() * gw


@pytest.mark.parametrize("rescale", [1, 0])
def test_cagrad_three_tasks_equals_libmtl(libmtl, rescale):
    """CAGrad, T=3 (LibMTL 1.1.5's objective is written for 3 tasks): combined gradient vs
    LibMTL's (calpha=0.5; rescale=1 is LibMTL's default, /(1+c²); rescale=0 none) within
    1e-4 (both solvers stop at ~1e-5 on the dual weights)."""
    worst = 0.0
    for seed in range(4):
        J = jacobian(seed, 3)
        _, theirs = libmtl.on_jacobian("CAGrad", J, calpha=0.5, rescale=rescale)
        ours = CAGrad(c=0.5, rescale=bool(rescale)).weights(gram_inputs(J)) @ J
        worst = max(worst, float((ours - theirs).abs().max()))
    assert worst < 1e-4, worst


def test_cagrad_many_tasks_equals_algorithm_1():
    """CAGrad, T=5 and 10, c=0.4: combined gradient vs Algorithm 1 solved by SLSQP at
    ftol 1e-12, within 1e-4 (Clarabel's default accuracy on the dual weights)."""
    worst = 0.0
    for seed, T in [(0, 5), (1, 5), (2, 10)]:
        J = jacobian(seed, T)
        ours = CAGrad(c=0.4, rescale=True).weights(gram_inputs(J)) @ J
        worst = max(worst, float((ours - cagrad_reference(J, 0.4) / 1.16).abs().max()))
    assert worst < 1e-4, worst


def min_norm_qp(J: torch.Tensor) -> np.ndarray:
    """min ‖αᵀJ‖² over the simplex by SLSQP at ftol 1e-15 (an independent solver)."""
    G = (J @ J.T).numpy()
    G = G / np.trace(G)
    T = G.shape[0]
    res = minimize(
        lambda a: a @ G @ a,
        np.full(T, 1.0 / T),
        jac=lambda a: 2 * G @ a,
        bounds=[(0, 1)] * T,
        constraints={"type": "eq", "fun": lambda a: 1 - a.sum()},
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x


def test_mgda_two_tasks_is_the_closed_form():
    """MGDA-UB, T=2: α₁ = clip(((g₂-g₁)·g₂) / ‖g₁-g₂‖², 0, 1), within 1e-9 (an exact solve
    in float64), including a case clipped to 1 (g₁ much shorter, along g₂)."""
    cases = [jacobian(s, 2) for s in range(4)]
    g2 = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    cases.append(torch.stack([0.1 * g2 + 0.01, g2]))
    for J in cases:
        g1, g2 = J
        a1 = ((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1)
        expected = torch.stack([a1, 1 - a1])
        torch.testing.assert_close(MGDAUB().weights(gram_inputs(J)), expected, rtol=0, atol=1e-9)
    assert expected[0] == 1.0


def test_mgda_many_tasks_equals_libmtl_and_a_qp_solver(libmtl):
    """MGDA-UB, T=4: weights vs LibMTL's MGDA (mgda_gn='none': its Frank-Wolfe variant stops
    when Σ|Δα| < 1e-5) within 5e-4; vs SLSQP on the QP (T=4, 10, 40) within 1e-5, and never
    a larger norm than SLSQP's."""
    worst_libmtl = worst_qp = 0.0
    for seed, T in [(0, 4), (1, 4), (2, 4), (3, 4), (4, 10), (5, 40)]:
        J = jacobian(seed, T, decades=1.0)
        ours = MGDAUB().weights(gram_inputs(J))
        if T == 4:
            theirs, _ = libmtl.on_jacobian("MGDA", J, mgda_gn="none")
            worst_libmtl = max(worst_libmtl, float((ours - torch.from_numpy(theirs)).abs().max()))
        qp = min_norm_qp(J)
        worst_qp = max(worst_qp, float(np.abs(ours.numpy() - qp).max()))
        G = (J @ J.T).numpy()
        assert ours.numpy() @ G @ ours.numpy() <= qp @ G @ qp * (1 + 1e-9)
        assert ours.min() >= 0 and abs(float(ours.sum()) - 1) < 1e-12
    assert worst_libmtl < 5e-4 and worst_qp < 1e-5, (worst_libmtl, worst_qp)


def test_imtl_g_is_the_closed_form_and_projects_equally(libmtl):
    """IMTL-G: α₂..T = g₁Uᵀ(DUᵀ)⁻¹, α₁ = 1 - Σα (U rows u₁-u_t of unit gradients, D rows
    g₁-g_t), within 1e-8 (float64 inverse); the update's projections on every unit task
    gradient are equal (1e-8 relative); LibMTL's IMTL at init (loss scales 0, so pure IMTL-G)
    within 1e-5 (float32)."""
    for seed, T in [(0, 3), (1, 4), (2, 6)]:
        J = jacobian(seed, T, decades=1.0)
        U = J / J.norm(dim=1, keepdim=True)
        D, Ud = J[0] - J[1:], U[0] - U[1:]
        rest = J[0] @ Ud.T @ torch.linalg.inv(D @ Ud.T)
        expected = torch.cat([1 - rest.sum(0, keepdim=True), rest])
        ours = IMTLG().weights(gram_inputs(J))
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-8)
        projections = U @ (ours @ J)
        assert float((projections - projections[0]).abs().max() / projections[0].abs()) < 1e-8
        theirs, _ = libmtl.on_jacobian("IMTL", J)
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)


def test_nash_mtl_meets_the_bargaining_condition():
    """Nash-MTL, max_norm=0: α_k (K α)_k = 1 for every task (K = G Gᵀ, the paper's condition
    GᵀGα = 1/α) within 1e-6 (the solver stops at 1e-7), on Gramians whose gradient norms
    span up to three decades, T = 2..40; max_norm=1: the update's norm is min(‖·‖, 1)."""
    worst = 0.0
    for seed, T, decades in [(0, 2, 0), (1, 3, 1), (2, 5, 2), (3, 8, 3), (4, 10, 2), (5, 40, 3)]:
        J = jacobian(seed, T, decades=decades)
        K = J @ J.T
        alpha = NashMTL(T, max_norm=0.0).weights(gram_inputs(J)).double()
        worst = max(worst, float((alpha * (K @ alpha) - 1).abs().max()))
        assert alpha.min() > 0
        clipped = NashMTL(T, max_norm=1.0).weights(gram_inputs(J)).double()
        norm, free = (clipped @ J).norm(), (alpha @ J).norm()
        torch.testing.assert_close(norm, free.clamp(max=1.0), rtol=1e-9, atol=0)
        torch.testing.assert_close(clipped / norm, alpha / free, rtol=1e-9, atol=0)
    assert worst < 1e-6, worst


def test_nash_mtl_reuses_weights_between_updates_and_gives_vanished_tasks_zero():
    """update_every=3 reuses the last weights exactly; a task with no gradient gets weight
    exactly 0 and the others meet their condition (1e-6)."""
    method = NashMTL(3, max_norm=0.0, update_every=3)
    first = method.weights(gram_inputs(jacobian(0, 3)))
    assert torch.equal(method.weights(gram_inputs(jacobian(1, 3), step=1)), first)
    assert not torch.equal(method.weights(gram_inputs(jacobian(1, 3), step=3)), first)
    J = jacobian(2, 3)
    J[2] = 0
    alpha = NashMTL(3, max_norm=0.0).weights(gram_inputs(J))
    assert alpha[2] == 0
    assert float((alpha[:2] * ((J @ J.T) @ alpha)[:2] - 1).abs().max()) < 1e-6


# -- state, for every method -----------------------------------------------------------------


def drive(method, step: int, losses: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """One step of the combiner's protocol: weights, then end_step."""
    gram = J @ J.T if method.needs_gram else None
    weights = method.weights(StepInputs(losses, gram, step, step // 2))
    after = losses * 0.9 if method.wants_losses_after_step else None
    method.end_step(losses, 0.01, after)
    return weights


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_survives_a_weights_only_load(name, tmp_path):
    """Every method after 5 steps: its state_dict through torch.save / torch.load
    (weights_only=True, as the checkpoint loader) into a fresh method gives exactly the
    same weights for the next 3 steps as the method that kept running."""
    from mtl.config import TasksConfig

    tasks = TasksConfig(method=name)
    tasks.nash_mtl.update_every = 2  # the reused weights are state too
    T = 4
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(T, generator=g) + 0.1, jacobian(s, T)) for s in range(8)]
    method = build_method(tasks, T, seed=3)
    for step in range(5):
        drive(method, step, *data[step])
    torch.save(method.state_dict(), tmp_path / "state.pt")
    restored = build_method(tasks, T, seed=3)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for step in range(5, 8):
        a, b = drive(method, step, *data[step]), drive(restored, step, *data[step])
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), (name, step, a, b)

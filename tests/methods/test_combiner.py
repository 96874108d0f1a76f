"""The combiner's gradient plumbing on real tiny models, checked against plain autograd.

What the engine back-propagates must give the shared parameters Σ_k w_k ∇L_k and every head
its own unweighted ∇L_k (LibMTL's and TorchJD's convention); the Gramians the gradient
methods read must be those of the per-task gradients, computed here independently (per-task
``autograd.grad`` on a copy of the model, LibMTL's own gradient code). Pure PyTorch: no Ray,
no DeepSpeed (the loop hands the same loss to ``engine.backward``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mtl.config import load_config
from mtl.data import benchmark_taskset, load_splits, make_loader
from mtl.losses import normalize_weights, scalarize, task_losses
from mtl.methods import GRADIENT_METHODS, METHODS, build_combiner
from mtl.models import build_model
from mtl.train.step import auxiliary_total, cast_outputs, forward_losses

TINY = "configs/tiny.yaml"


def setup(cache_dir, *overrides):
    """configs/tiny.yaml shrunk (3 tasks, width 8), a model, one batch of 8."""
    cfg = load_config(
        TINY,
        [
            "model.width=8",
            "model.depth=2",
            "tasks.names=[left,right,depth]",
            "data.train_size=32",
            "data.val_size=16",
            f"data.cache_dir={cache_dir}",
            *overrides,
        ],
    )
    taskset = benchmark_taskset(cfg.data)
    if cfg.tasks.names:
        taskset = taskset.subset(cfg.tasks.names)
    torch.manual_seed(0)
    model = build_model(cfg.model, taskset)
    train, _ = load_splits(cfg.data, taskset)
    batch = next(iter(make_loader(train, 8, train=True)))
    priors = normalize_weights(cfg.tasks.weights, taskset.loss_keys)
    return cfg, taskset, model, batch, priors


def loss_fn(batch, taskset):
    return lambda outputs: task_losses(cast_outputs(outputs), batch, taskset)


def record_grams(combiner) -> list[torch.Tensor]:
    """Every Gramian the combiner hands its method."""
    grams: list[torch.Tensor] = []
    weights = combiner.method.weights

    def spy(inputs):
        grams.append(inputs.gram.detach().clone())
        return weights(inputs)

    combiner.method.weights = spy
    return grams


def per_key_grads(losses, params):
    """(T, d) rows: each loss's gradient on ``params`` by its own autograd.grad."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Max |difference| within ``tol`` × max |expected| (float32 sums in another order)."""
    diff = float((actual - expected).abs().max())
    assert diff <= tol * float(expected.abs().max()), (diff, float(expected.abs().max()))


def grads_of(params) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )


def test_ew_with_priors_back_propagates_todays_scalarization(cache_dir, one_thread):
    """EW with tasks.weights: the combiner's loss and objective equal Σ p_k L_k
    (mtl.losses.scalarize) within float32 rounding (assert_close defaults)."""
    cfg, taskset, model, batch, priors = setup(
        cache_dir, "tasks.weights={left: 3, right: 1, depth: 4}"
    )
    combiner = build_combiner(cfg.tasks, taskset, priors, model, cfg.train.seed)
    losses = forward_losses(model, batch, taskset)
    task = {k: losses[k] for k in taskset.loss_keys}
    loss, objective = combiner.combine(task, 0, 0)
    torch.testing.assert_close(loss, scalarize(task, priors))
    torch.testing.assert_close(objective, scalarize(task, priors))
    assert combiner.mean_weights() == pytest.approx(priors, rel=1e-6)


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_gradient_method_backward_is_the_weighted_sum(cache_dir, one_thread, libmtl, method):
    """Hard sharing, tasks.gradients=params: after combine + backward the shared parameters'
    .grad is Σ_k w_k g_k and each head's its own unweighted g_k, with g_k by per-task
    autograd.grad on an identical copy of the model; the Gramian equals J Jᵀ of LibMTL's own
    per-task gradients (AbsWeighting._get_grads). 1e-5 of the largest entry: float32 sums
    in another order."""
    cfg, taskset, model, batch, priors = setup(cache_dir, f"tasks.method={method}")
    reference = copy.deepcopy(model)
    combiner = build_combiner(cfg.tasks, taskset, priors, model, cfg.train.seed)
    grams = record_grams(combiner)
    losses = forward_losses(model, batch, taskset)
    task = {k: losses[k] for k in taskset.loss_keys}
    loss, _ = combiner.combine(task, 0, 0, loss_fn(batch, taskset))
    loss.backward()
    w = combiner.last_weights  # uniform priors: the method's weights themselves

    ref_losses = forward_losses(reference, batch, taskset)
    keys = taskset.loss_keys
    shared = [p for n, p in reference.named_parameters() if not n.startswith("heads.")]
    J = per_key_grads([ref_losses[k] for k in keys], shared)
    ours_shared = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    assert_near(grads_of(ours_shared), w @ J)
    for key in keys:
        head = list(reference.heads[key].parameters())
        (expected,) = per_key_grads([ref_losses[key]], head)
        torch.testing.assert_close(grads_of(list(model.heads[key].parameters())), expected)

    lib = libmtl.weighting("EW", len(keys), shared)
    lib._compute_grad_dim()
    lib_J = lib._compute_grad([ref_losses[k] for k in keys], mode="autograd")
    assert_near(grams[0], lib_J @ lib_J.T)


def test_representation_gram_is_that_of_the_trunk_output_gradients(cache_dir, one_thread):
    """tasks.gradients=representation: the Gramian equals that of each task's gradient
    w.r.t. the trunk's output (forward_features, then forward_head by hand on a copy), and
    backward still gives the shared parameters Σ_k w_k g_k; 1e-5 of the largest entry
    (float32)."""
    cfg, taskset, model, batch, priors = setup(
        cache_dir, "tasks.method=mgda_ub", "tasks.gradients=representation"
    )
    reference = copy.deepcopy(model)
    combiner = build_combiner(cfg.tasks, taskset, priors, model, cfg.train.seed)
    grams = record_grams(combiner)
    losses = forward_losses(model, batch, taskset)
    loss, _ = combiner.combine(
        {k: losses[k] for k in taskset.loss_keys}, 0, 0, loss_fn(batch, taskset)
    )
    loss.backward()

    image = batch["image"]
    features = reference.forward_features(image)
    outputs = reference.forward_head(features, tuple(image.shape[-2:]))
    ref_losses = task_losses(cast_outputs(outputs), batch, taskset)
    keys = taskset.loss_keys
    Z = per_key_grads([ref_losses[k] for k in keys], [features])
    assert_near(grams[0], Z @ Z.T)
    shared = [p for n, p in reference.named_parameters() if not n.startswith("heads.")]
    J = per_key_grads([ref_losses[k] for k in keys], shared)
    ours_shared = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    assert_near(grads_of(ours_shared), combiner.last_weights @ J)


@pytest.mark.parametrize("method", ["uw", "pcgrad"])
def test_multi_domain_backward_is_the_weighted_sum_of_domain_losses(cache_dir, one_thread, method):
    """Digits (3 domains, one shared head): every parameter is shared, and after backward
    its .grad is Σ_d w_d ∇L_d (per-domain autograd.grad on a copy), within 1e-5 of the
    largest entry (float32)."""
    cfg, taskset, model, batch, priors = setup(
        cache_dir,
        "data.benchmark=digits",
        "data.image_size=28",
        "tasks.names=[]",
        f"tasks.method={method}",
    )
    assert taskset.multi_domain
    reference = copy.deepcopy(model)
    combiner = build_combiner(cfg.tasks, taskset, priors, model, cfg.train.seed)
    losses = forward_losses(model, batch, taskset)
    loss, _ = combiner.combine(
        {k: losses[k] for k in taskset.loss_keys}, 0, 0, loss_fn(batch, taskset)
    )
    loss.backward()
    ref_losses = forward_losses(reference, batch, taskset)
    params = list(reference.parameters())
    J = per_key_grads([ref_losses[k] for k in taskset.loss_keys], params)
    assert_near(grads_of(list(model.parameters())), combiner.last_weights @ J)


def train_steps(cfg, taskset, model, batch, priors, steps=3):
    """The loop's protocol in plain PyTorch: forward, combine, backward, step, end_step."""
    combiner = build_combiner(cfg.tasks, taskset, priors, model, cfg.train.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def recompute():
        return task_losses(cast_outputs(model(batch["image"])), batch, taskset)

    objectives = []
    for step in range(steps):
        optimizer.zero_grad()
        losses = forward_losses(model, batch, taskset)
        loss, objective = combiner.combine(
            {k: losses[k] for k in taskset.loss_keys}, step, 0, loss_fn(batch, taskset)
        )
        (loss + auxiliary_total(losses)).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        combiner.end_step(0.01, recompute)
        objectives.append(float(objective.detach()))
    return combiner, objectives


@pytest.mark.parametrize("model_name", ["hard_sharing", "interrogate", "moe"])
def test_every_method_trains_every_architecture(cache_dir, one_thread, tmp_path, model_name):
    """Every method x hard sharing / InterroGate / task-routed MoE: 3 optimizer steps with
    finite objectives and weights; the combiner's state through torch.save and a weights-only
    torch.load restores into a fresh combiner (exactly equal state)."""
    for method in sorted(METHODS):
        cfg, taskset, model, batch, priors = setup(
            cache_dir, f"model.name={model_name}", f"tasks.method={method}"
        )
        combiner, objectives = train_steps(cfg, taskset, model, batch, priors)
        weights = combiner.mean_weights()
        assert all(torch.isfinite(torch.tensor(objectives))), (method, objectives)
        assert all(torch.isfinite(torch.tensor(list(weights.values())))), (method, weights)
        torch.save(combiner.state_dict(), tmp_path / f"{method}.pt")
        state = torch.load(tmp_path / f"{method}.pt", weights_only=True)
        fresh = build_combiner(cfg.tasks, taskset, priors, model, cfg.train.seed)
        assert fresh.load_state_dict(state), method
        assert_same(fresh.state_dict(), combiner.state_dict())
        if combiner.taps is not None:
            combiner.taps.remove()
        if fresh.taps is not None:
            fresh.taps.remove()


def assert_same(a, b) -> None:
    """Nested dicts/lists of tensors and plain values, exactly equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b

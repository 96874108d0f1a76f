"""The fixed single-gated MoE (front program + expert programs + dispatch) predicts what the
trained model predicts in eval, at several thresholds, eager and exported."""

from __future__ import annotations

import pytest
import torch

from mtl.models.single_gate import confidence
from mtl.prune_single_gate import export_single_gate, fix_single_gate
from tests.models.test_single_gate import images, model, to_stage3

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(backbone: str = "resnet"):
    net = model(backbone).train()
    x = images(16)
    to_stage3(net, x)
    with torch.no_grad():  # experts unlike the base and unlike each other; BN statistics move
        for expert in net.experts:
            for p in expert.parameters():
                p.add_(0.3 * torch.randn_like(p))
        net(x)
    return net.eval()


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
@pytest.mark.parametrize("threshold", ["all exit", "half exit", "none exit"])
def test_fixed_parts_match_the_trained_model(backbone, threshold):
    net = trained(backbone)
    x = images(12, seed=7)
    with torch.no_grad():
        net.set_stage("base")
        conf = confidence(net(x), net.taskset)
        net.set_stage("experts")
    net.threshold = {"all exit": 1e-6, "half exit": float(conf.median()), "none exit": 1.0}[
        threshold
    ]
    with torch.no_grad():
        want = net(x)
    fixed = fix_single_gate(net, (16, 16))
    got, exits, route = fixed.run(x)
    for head, value in want.items():
        torch.testing.assert_close(got[head], value, rtol=0, atol=1e-5)
    assert torch.equal(route, net.assignment(x))
    expected = {"all exit": 12, "half exit": int((conf >= conf.median()).sum()), "none exit": 0}
    assert int(exits.sum()) == expected[threshold] and 0 < expected["half exit"] < 12


def test_exported_programs_match_for_any_batch_size():
    net = trained()
    with torch.no_grad():
        net.set_stage("base")
        net.threshold = float(confidence(net(images(16)), net.taskset).median())
        net.set_stage("experts")
    fixed = fix_single_gate(net, (16, 16))
    exported = export_single_gate(fixed, images(4))
    for n in (1, 5, 16):
        x = images(n, seed=n)
        want = fixed(x)
        for head, value in exported(x).items():
            torch.testing.assert_close(value, want[head], rtol=0, atol=1e-5)

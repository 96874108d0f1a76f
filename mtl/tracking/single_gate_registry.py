"""Registry entries for a fixed single-gated MoE (DESIGN.md §4.5, §5): K + 1 programs, one pyfunc.

The early exit is data-dependent control flow, so the fixed model (``mtl.prune_single_gate``)
is a *front* program (prefix, base branch, confidence, gate route) and one program per expert,
with a few lines of dispatch. The entry holds them as pt2 artifacts (``front.pt2``,
``expert_0.pt2`` ...) plus the threshold; ``predict`` runs the front, keeps the base's outputs
where the confidence is at least the threshold, runs each expert only on the rows routed to it
and averages base and expert outputs there, as ``SingleGateMoE``'s eval forward does. Input,
output format (``{head: np.ndarray}``), refusals and serving are every entry's
(``mtl.tracking.registry``); loading needs only torch, numpy and mlflow.

Version tags, beyond what ``register_fixed_model`` sets:

* ``threshold``, ``num_experts``, ``branch_at``;
* FLOPs per image (``branch_flops``): ``flops_base`` (prefix and base branch, what an exit
  costs), ``flops_gate``, ``flops_expert``, ``flops_full`` (base + gate + one expert, what a
  sample that does not exit costs), and ``expected_flops_per_image`` at the threshold
  (``expected_flops``; also ``flops_per_image``, the tag other entries are compared by), from
  ``exit_rate`` measured by the registered programs on the images ``exit_rate_on`` names;
* the gate's usage (``expert_share``, ``usage_entropy``, ``gate_collapsed``; ``assignment``)
  over ``assignment_on``, whose heatmap is the structure picture;
* ``verified_max_abs_diff``: the largest difference between the registered programs and the
  model's eval forward on the example (at most ``ATOL``, else nothing is registered).
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from torch import Tensor

from mtl import prune_single_gate
from mtl.models.single_gate import SingleGateMoE, branch_flops, expected_flops
from mtl.prune_single_gate import FixedSingleGate, fix_single_gate
from mtl.single_gate_eval import assignment, assignment_figure, group_names
from mtl.tasks import TaskSet
from mtl.tracking import policy
from mtl.tracking.registry import (
    CANDIDATE,
    EXAMPLE_ROWS,
    PICTURE,
    FixedProgramModel,
    _annotate,
    _check_example,
    _log_pyfunc,
    _new_version,
    _tracking_uri,
    fixed_signature,
)

FRONT = "front"  # pyfunc artifact key (and file stem) of the front program
ATOL = 1e-5  # registered programs vs the model's eval forward, as export_fixed allows
Batch = dict[str, Any]


def expert_key(k: int) -> str:
    """Pyfunc artifact key (and file stem) of expert ``k``'s program."""
    return f"expert_{k}"


def load_fixed(paths: dict[str, str], num_experts: int, threshold: float) -> FixedSingleGate:
    """The dispatch over the saved programs: ``paths`` maps ``FRONT`` and ``expert_key(k)``
    to pt2 files."""
    front = torch.export.load(paths[FRONT]).module()
    experts = [torch.export.load(paths[expert_key(k)]).module() for k in range(num_experts)]
    return FixedSingleGate(front, experts, threshold)


class SingleGateProgramModel(FixedProgramModel):
    """Pyfunc wrapper of a fixed single-gated MoE: front and expert programs, the exit rule.

    ``FixedProgramModel.predict`` checks the input, calls ``self._program(x)`` and checks the
    outputs; here ``_program`` is the dispatch over the K + 1 programs (``FixedSingleGate``,
    pickled by value with this class).

    Args:
        in_shape: ``(C, H, W)`` every input image must have.
        heads: Head names, in output order.
        threshold: Exit confidence; 1 never exits.
        num_experts: K, the number of expert programs.
        max_rows: Most images per call (``tracking.serve_max_rows``).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        heads: list[str],
        threshold: float,
        num_experts: int,
        max_rows: int = 1024,
    ) -> None:
        super().__init__(in_shape, heads, (), max_rows)
        self.threshold = float(threshold)
        self.num_experts = int(num_experts)

    def load_context(self, context: Any) -> None:
        self._program = load_fixed(context.artifacts, self.num_experts, self.threshold)


@torch.no_grad()
def export_programs(fixed: FixedSingleGate, example: Tensor) -> dict[str, Any]:
    """``{FRONT: program, expert_key(k): program}``, ``torch.export`` programs of the eager
    parts with a dynamic batch dim (as ``export_single_gate``, which keeps only their
    modules)."""
    # torch.export specialises a size-1 dim to a constant, so trace with a batch of 2 at least.
    trace = example if example.shape[0] > 1 else example.expand(2, *example.shape[1:])
    batch = torch.export.Dim("batch")
    programs = {FRONT: torch.export.export(fixed.front, (trace,), dynamic_shapes=({0: batch},))}
    h = fixed.front(trace)[3]  # the prefix's stream, what every expert reads
    for k, expert in enumerate(fixed.experts):
        programs[expert_key(k)] = torch.export.export(expert, (h,), dynamic_shapes=({0: batch},))
    return programs


def verify(
    model: SingleGateMoE, fixed: FixedSingleGate, x: Tensor
) -> tuple[dict[str, Tensor], float]:
    """(the model's eval outputs on ``x``, the largest |difference| of ``fixed``'s from them).

    Raises:
        ValueError: The model's outputs are not finite, or a difference exceeds ``ATOL``.
    """
    with torch.no_grad():
        want = model(x)
    bad = [head for head, value in want.items() if not torch.isfinite(value).all()]
    if bad:
        raise ValueError(
            f"the single-gate model's outputs {bad} are not finite on the example batch: its "
            "weights (or the example) are not finite, so there is nothing to register"
        )
    got, exits, _ = fixed.run(x)
    diffs = {head: float((got[head] - value).abs().max()) for head, value in want.items()}
    worst = max(diffs, key=diffs.__getitem__)
    if diffs[worst] > ATOL:
        raise ValueError(
            f"the exported single-gate programs differ from the model's eval forward on the "
            f"example: max abs difference {diffs[worst]:.3g} on head {worst!r} (allowed "
            f"{ATOL:g}; per head {diffs}; {int(exits.sum())} of {len(x)} images exit at "
            f"threshold {fixed.threshold:g}, and a confidence within rounding of the "
            "threshold can flip an exit): nothing is registered"
        )
    return want, diffs[worst]


def cost_tags(
    model: SingleGateMoE, fixed: FixedSingleGate, images: list[Tensor], on: str
) -> dict[str, str]:
    """The FLOPs tags, with the exit rate ``fixed`` gives on ``images`` (described by ``on``)."""
    parts = branch_flops(model, images[0][:1])
    exited = sum(int(fixed.run(x)[1].sum()) for x in images)
    total = sum(len(x) for x in images)
    expected = expected_flops(parts, exited / total)
    return {
        "threshold": str(model.threshold),
        "num_experts": str(model.num_experts),
        "branch_at": str(len(model.prefix) - 1),  # the prefix is the stem and branch_at blocks
        "flops_base": str(parts["base"]),
        "flops_gate": str(parts["gate"]),
        "flops_expert": str(parts["expert"]),
        "flops_full": str(parts["base"] + parts["gate"] + parts["expert"]),
        "exit_rate": str(exited / total),
        "exit_rate_on": f"{on} ({total} images)",
        "expected_flops_per_image": str(expected),
        "flops_per_image": str(expected),
    }


def assignment_tags(
    model: SingleGateMoE, batches: Sequence[Batch], taskset: TaskSet, on: str, title: str
) -> tuple[dict[str, str], Any]:
    """(the gate's usage as tags, its assignment heatmap) over ``batches``; without labels
    (``on == "example"``) all images form one group."""
    groups = taskset if on != "example" else replace(taskset, heads=(), domains=())
    result = assignment(model, batches, groups)
    tags = {
        "expert_share": ",".join(f"{s:.4f}" for s in result["share"]),
        "usage_entropy": f"{result['usage_entropy']:.4f}",
        "gate_collapsed": str(result["collapsed"]),
        "assignment": json.dumps(result["counts"]),
        "assignment_on": f"{on} ({result['samples']} images, groups: {result['group_by']})",
    }
    return tags, assignment_figure(result, group_names(groups), title)


@contextmanager
def _by_value(*modules: ModuleType) -> Iterator[None]:
    """Pickle these modules' classes and functions by value (the wrapper and the dispatch),
    so the entry loads where ``mtl`` is not importable."""
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


def _check_model(model: SingleGateMoE, taskset: TaskSet) -> None:
    if model.stage != "experts":
        raise ValueError(
            f"the model is in stage {model.stage!r}: its experts are not trained yet; register "
            "a stage-3 model (model.set_stage('experts'))"
        )
    heads, want = sorted(model.base.heads), sorted(h.name for h in taskset.heads)
    if heads != want:
        raise ValueError(f"the model has heads {heads}, task set {taskset.name!r} has {want}")


def _prepare(
    model: SingleGateMoE,
    example: Tensor,
    taskset: TaskSet,
    batches: list[Batch] | None,
    folder: Path,
    name: str,
) -> tuple[dict[str, str], dict[str, Tensor], dict[str, str]]:
    """Export, save, reload and verify the programs, measure and picture them.

    Returns:
        (pyfunc artifact files, the model's outputs on the example, the computed tags).
    """
    net = copy.deepcopy(model).cpu().eval()
    x = example.detach().cpu()
    programs = export_programs(fix_single_gate(net, taskset.image_size), x)
    files = {key: str(folder / f"{key}.pt2") for key in programs}
    for key, program in programs.items():
        torch.export.save(program, files[key])
    fixed = load_fixed(files, net.num_experts, net.threshold)  # what the entry will run
    outputs, diff = verify(net, fixed, x)
    on = "example" if batches is None else "assignment_batches"
    batches = [{"image": x}] if batches is None else batches
    images = [b["image"].detach().cpu().float() for b in batches]
    tags = {**cost_tags(net, fixed, images, on), "verified_max_abs_diff": f"{diff:.3g}"}
    usage, figure = assignment_tags(net, batches, taskset, on, f"{name}: gate assignment")
    files[PICTURE] = str(folder / f"{PICTURE}.png")
    figure.savefig(files[PICTURE], dpi=120)
    return files, outputs, {**tags, **usage}


def register_single_gate(
    uri: str,
    run_id: str,
    model: SingleGateMoE,
    example: Tensor,
    taskset: TaskSet,
    *,
    name: str,
    tags: dict[str, str],
    identity: dict[str, str] | None = None,
    max_rows: int = 1024,
    assignment_batches: Iterable[Batch] | None = None,
) -> ModelVersion:
    """Fix, verify and log a trained single-gated MoE into run ``run_id`` as a pyfunc,
    register it, alias it ``candidate``.

    Args:
        uri: Tracking (and registry) URI.
        run_id: Existing run the model is logged into; its status is left unchanged.
        model: A stage-3 ``SingleGateMoE``; its threshold is the entry's. Left as it was.
        example: A real input batch ``(B, C, H, W)``: traces the export, is the verification
            batch (and, without ``assignment_batches``, measures the exit rate and the gate's
            assignment as one group); its first ``EXAMPLE_ROWS`` images are the input example.
        taskset: Gives the input shape and the heads.
        name: Registered model name (created if missing).
        tags: Version tags (string values); the computed ones (module docstring) win.
        identity: What the name stands for (``mtl.tracking.policy.IDENTITY``); default the one
            of ``taskset`` with an unrecorded data source.
        max_rows: Most images the served model takes per request.
        assignment_batches: Labelled evaluation batches (``"image"``, ``"targets"``,
            ``"domain"`` where multi-domain), iterated once: measure the exit rate and give
            the assignment per group.

    Returns:
        The new model version, with its tags and description.

    Raises:
        NameTaken: ``name`` stands for models with another identity (a ``ValueError``).
        ValueError: ``example`` does not fit ``taskset``, the model is not in stage
            ``"experts"`` or has other heads, or the programs differ from the model by more
            than ``ATOL`` (the message names the difference), or ``assignment_batches`` is
            empty; nothing is logged then.
    """
    _check_example(example, taskset, None)
    _check_model(model, taskset)
    if identity is None:
        identity = policy.identity(taskset, tags.get("data_source", "?"), False)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    policy.check_name(client, name, identity)
    batches = None if assignment_batches is None else list(assignment_batches)
    if batches == []:
        raise ValueError("assignment_batches is empty: give labelled batches, or None (example)")
    with tempfile.TemporaryDirectory() as tmp:
        files, outputs, computed = _prepare(model, example, taskset, batches, Path(tmp), name)
        signature = fixed_signature(taskset, outputs)
        tags = {**tags, **identity, "serve_max_rows": str(max_rows), **computed}
        wrapper = SingleGateProgramModel(
            tuple(example.shape[1:]), list(outputs), model.threshold, model.num_experts, max_rows
        )
        rows = example[:EXAMPLE_ROWS].detach().cpu().numpy()
        with _tracking_uri(uri), _by_value(sys.modules[__name__], prune_single_gate):
            model_id = _log_pyfunc(
                client, run_id, name, files, python_model=wrapper, signature=signature,
                input_example=rows,
            )  # fmt: skip
            version = _new_version(client, name, model_id, run_id, identity)
        _annotate(client, version, taskset, signature, tags, Path(files[PICTURE]))
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return client.get_model_version(name, version.version)

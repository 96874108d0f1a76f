"""What a registered model name stands for, and which of its versions is ``champion``.

A name identifies what its models predict. Its registered model carries five *identity* tags,
written when the name is created:

- ``benchmark``: the task set's benchmark, e.g. ``multimnist``;
- ``data_source``: where its images come from (``mnist``, ``fashion_mnist``, ``celeba``,
  ``files:<folder>``, ``local:<folder>``);
- ``task_set``: the trained tasks, in head order, e.g. ``left,right,semseg``;
- ``input``: the input signature, e.g. ``float32 (-1, 1, 36, 36)``;
- ``outputs``: each head's kind and size, e.g. ``left=classification(10),...``.

A new version whose identity differs from its name's in any of these is refused before
anything is logged (``NameTaken``, a ``ValueError``); the message names the differing fields
and how to register under another name. The default name (``default_name``) already carries a
non-default data source and a task subset, so only an explicit name can collide.

``champion`` (``promote_best``) goes to the best version on one validation metric among the
versions that share the reference version's task set and evaluation data (tag ``eval_data``);
the reference is the version ``candidate`` points at (the newest registration). Values come
from each version's source run (``val/<metric>``, full precision), else from its
``metric/<metric>`` tag. A tie goes to the newer version. The decision, every compared value
and every left-out version with its reason, is kept as the registered model's tag
``champion_decision``; the chosen version gets ``champion_metric``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl.config import DataConfig
from mtl.tasks import TaskSet
from mtl.tune.space import LOWER_IS_BETTER

log = logging.getLogger(__name__)

IDENTITY = ("benchmark", "data_source", "task_set", "input", "outputs")
CANDIDATE, CHAMPION = "candidate", "champion"
# Benchmarks generated from an MNIST-family source (data.source); the source is the data.
GENERATED = frozenset({"multimnist", "digits"})
DEFAULT_SOURCE = DataConfig().source
DECISION_TAG_LIMIT = 5000  # the registry's tag limit (mtl.tracking.registry.TAG_LIMIT)


class NameTaken(ValueError):
    """A registered name already stands for models that predict something else."""


def data_source(data: DataConfig) -> str:
    """Where a benchmark's images come from, as the ``data_source`` tag says it."""
    if data.benchmark in GENERATED:
        return data.source
    if data.benchmark == "local":
        return f"local:{Path(data.local.path).expanduser().name or '?'}"
    if data.benchmark == "files":
        return f"files:{Path(data.root or '.').expanduser().resolve().name}"
    return data.benchmark  # a published dataset: its layout is the source wherever it lives


def eval_data(data: DataConfig, val_batches: int = 0) -> str:
    """The validation data a version's metrics were measured on (tag ``eval_data``)."""
    parts = [data_source(data), f"{data.eval_split} split"]
    if data.benchmark in GENERATED:
        parts.append(f"val_size={data.val_size} seed={data.seed}")
    else:
        parts.append(f"val_fraction={data.val_fraction} seed={data.seed}")
    if val_batches:
        parts.append(f"first {val_batches} batches")
    return ", ".join(parts)


def input_text(taskset: TaskSet, with_domain: bool) -> str:
    """The input signature in words: ``float32 (-1, C, H, W)``, plus the domain if routed."""
    height, width = taskset.image_size
    image = f"float32 (-1, {taskset.in_channels}, {height}, {width})"
    if not with_domain:
        return image
    names = ", ".join(f"{i}={d}" for i, d in enumerate(taskset.domains))
    return f"{{image: {image}, domain: int64 (-1,) with {names}}}"


def identity(taskset: TaskSet, source: str, with_domain: bool) -> dict[str, str]:
    """The identity tags (``IDENTITY``) of models trained on ``taskset`` from ``source``."""
    return {
        "benchmark": taskset.name,
        "data_source": source,
        "task_set": ",".join(taskset.loss_keys),
        "input": input_text(taskset, with_domain),
        "outputs": ",".join(f"{h.name}={h.kind}({h.num_outputs})" for h in taskset.heads),
    }


def default_name(benchmark: str, data: DataConfig, tasks: tuple[str, ...], full: tuple[str, ...],
                 model: str) -> str:  # fmt: skip
    """``<benchmark>[-<source>][-<task>+<task>]-<model>``: a non-default data source and a
    task subset are part of the name, so training them never moves another model's aliases."""
    parts = [benchmark]
    source = data_source(data)
    if (data.benchmark in GENERATED and source != DEFAULT_SOURCE) or ":" in source:
        parts.append(source.split(":", 1)[-1])
    if tuple(tasks) != tuple(full):
        parts.append("+".join(tasks))
    parts.append(model)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


def differences(existing: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{field: (existing value, new value)} for each identity field the two disagree on;
    a field the existing name never recorded (registered before the tag existed) is skipped."""
    return {
        key: (existing[key], new[key])
        for key in IDENTITY
        if key in existing and key in new and existing[key] != new[key]
    }


def refusal(name: str, diff: dict[str, tuple[str, str]], suggestion: str) -> NameTaken:
    fields = "; ".join(f"{k} is {old!r} there, {new!r} here" for k, (old, new) in diff.items())
    return NameTaken(
        f"registered model {name!r} predicts something else ({fields}): a new version would "
        f"move its aliases to an unlike model. Register under another name: "
        f"tracking.model_name={suggestion} (in the config or as an override), or "
        f"`mtl register CHECKPOINT --name {suggestion}`; nothing was registered"
    )


def suggest(name: str, diff: dict[str, tuple[str, str]], new: dict[str, str]) -> str:
    """A name for the new model: ``name`` with the differing values that fit in a name."""
    extra = []
    if "data_source" in diff:
        extra.append(new["data_source"].split(":", 1)[-1])
    if "task_set" in diff or "outputs" in diff:
        extra.append(new["task_set"].replace(",", "+"))
    if "input" in diff:
        sizes = re.findall(r"\(-1, (\d+), (\d+), (\d+)\)", new["input"])
        extra += [f"{h}x{w}" for _, h, w in sizes[:1]]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join([name, *extra]) if extra else f"{name}-2")


def check_name(client: Any, name: str, new: dict[str, str]) -> dict[str, str] | None:
    """The existing name's identity tags if ``name`` exists and fits ``new``; ``None`` if
    ``name`` is free.

    A name registered before the identity tags existed is compared on what its newest
    version's tags record (``benchmark``, ``task_set``, ``input``).

    Raises:
        NameTaken: ``name`` stands for models with another identity.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    existing = {k: v for k, v in model.tags.items() if k in IDENTITY}
    if not existing:
        versions = client.search_model_versions(f"name='{name}'")
        if versions:
            newest = max(versions, key=lambda v: int(v.version))
            existing = {k: v for k, v in newest.tags.items() if k in IDENTITY}
    diff = differences(existing, new)
    if diff:
        raise refusal(name, diff, suggest(name, diff, new))
    return existing


def model_description(name: str, tags: dict[str, str]) -> str:
    """Markdown for the registered model's page (its versions describe themselves)."""
    rows = "\n".join(f"| {key} | `{tags[key]}` |" for key in IDENTITY if key in tags)
    return (
        f"### {name}: fixed multi-task inference models from `mtl`\n\n"
        f"Every version predicts the same heads from the same input; a model trained on other "
        f"data, tasks or input sizes is registered under another name.\n\n"
        f"| identity | value |\n|---|---|\n{rows}\n\n"
        f"Aliases: `{CANDIDATE}` is the newest registration, `{CHAMPION}` the version chosen by "
        f"`mtl promote {name} VERSION` or `mtl promote {name} --best METRIC` (tag "
        f"`champion_decision` says how). Load with "
        f"`mlflow.pyfunc.load_model('models:/{name}@{CHAMPION}')` or run "
        f"`mtl predict models:/{name}@{CHAMPION} IMAGES --out DIR`."
    )


@dataclass
class Decision:
    """The outcome of ``promote_best``: which version, on what, against which others."""

    version: str
    metric: str
    mode: str  # "max" or "min": which end of the metric wins
    reference: str  # the version whose task set and evaluation data the others must share
    compared: dict[str, float] = field(default_factory=dict)  # version -> value
    skipped: dict[str, str] = field(default_factory=dict)  # version -> why it was left out

    def summary(self) -> str:
        """One line for the registry's ``champion_decision`` tag."""
        values = ", ".join(f"v{v}={x:.6g}" for v, x in sorted(self.compared.items(), key=_num))
        left = "; ".join(f"v{v}: {why}" for v, why in sorted(self.skipped.items(), key=_num))
        return (
            f"v{self.version} by {self.metric} ({self.mode}) among versions like "
            f"v{self.reference}: {values}" + (f"; left out {left}" if left else "")
        )

    def lines(self, name: str) -> list[str]:
        lines = [
            f"promote {name} --best {self.metric} ({self.mode} is best, among versions with "
            f"version {self.reference}'s task set and evaluation data) chose version {self.version}"
        ]
        for version, value in sorted(self.compared.items(), key=lambda kv: int(kv[0])):
            mark = " <- champion" if version == self.version else ""
            lines.append(f"  version {version}: {self.metric} = {value:.6g}{mark}")
        for version, why in sorted(self.skipped.items(), key=lambda kv: int(kv[0])):
            lines.append(f"  version {version}: left out ({why})")
        return lines


def _num(item: tuple[str, Any]) -> int:
    return int(item[0])


def metric_mode(metric: str) -> str:
    return "min" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"


def _value(client: Any, version: Any, metric: str) -> float | None:
    metrics: dict[str, float] = {}
    if version.run_id:
        try:
            metrics = client.get_run(version.run_id).data.metrics
        except Exception as err:  # noqa: BLE001 - a deleted run: fall back on the tag
            log.debug("version %s: run %s unreadable (%s)", version.version, version.run_id, err)
    if f"val/{metric}" in metrics:
        return float(metrics[f"val/{metric}"])
    tag = version.tags.get(f"metric/{metric}", version.tags.get(metric))
    try:
        return float(tag) if tag is not None else None
    except ValueError:
        return None


def promote_best(uri: str, name: str, metric: str, mode: str | None = None) -> Decision:
    """Point ``champion`` of ``name`` at its best version on validation ``metric``.

    Args:
        uri: Tracking and registry URI.
        name: Registered model name.
        metric: Validation metric without ``val/``, e.g. ``left/accuracy`` or ``delta_mtl``.
        mode: ``"max"`` or ``"min"``; ``None`` takes the metric's direction.

    Raises:
        ValueError: ``name`` has no versions, or none of the comparable ones reports
            ``metric`` (the message lists why each was left out).
    """
    from mlflow.tracking import MlflowClient

    if mode not in (None, "max", "min"):
        raise ValueError(f"mode={mode!r}: give 'max', 'min' or nothing (the metric's direction)")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    if not versions:
        raise ValueError(f"registered model {name!r} has no versions: register one first")
    model = client.get_registered_model(name)
    reference = str(model.aliases.get(CANDIDATE) or max(versions, key=int))
    ref_tags = versions[reference].tags
    decision = Decision("", metric, mode or metric_mode(metric), reference)
    for number, version in versions.items():
        why = _incomparable(version.tags, ref_tags, reference)
        value = None if why else _value(client, version, metric)
        if not why and value is None:
            why = f"no val/{metric} in its run and no metric/{metric} tag"
        elif not why and not math.isfinite(value):
            why = f"{metric} = {value}"
        if why:
            decision.skipped[number] = why
        else:
            decision.compared[number] = value
    if not decision.compared:
        reasons = "; ".join(f"version {v}: {w}" for v, w in sorted(decision.skipped.items()))
        raise ValueError(f"no version of {name!r} can be ranked on {metric!r}: {reasons}")
    sign = 1 if decision.mode == "max" else -1
    decision.version = max(decision.compared, key=lambda v: (sign * decision.compared[v], int(v)))
    client.set_registered_model_alias(name, CHAMPION, decision.version)
    client.set_registered_model_tag(
        name, "champion_decision", decision.summary()[:DECISION_TAG_LIMIT]
    )
    value = decision.compared[decision.version]
    client.set_model_version_tag(name, decision.version, "champion_metric", f"{metric}={value}")
    return decision


def _incomparable(tags: dict[str, str], ref: dict[str, str], reference: str) -> str:
    for key, what in (("task_set", "task set"), ("eval_data", "evaluation data")):
        if tags.get(key) != ref.get(key):
            return f"{what} {tags.get(key)!r}, not version {reference}'s {ref.get(key)!r}"
    return ""

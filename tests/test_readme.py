"""README.md is in sync with what it documents: the generated blocks are what
``make report`` (benchmarks/report.py) writes from the committed raw files, mtl/config.py and
the CLI parser; every command of ``mtl --help`` is documented, and every ``mtl <command>`` the
README shows exists. Fast: no Ray, no training."""

import dataclasses
import importlib.util
import re
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report
_spec.loader.exec_module(report)


def _shown_commands(text: str) -> set[str]:
    """The NAME of every ``mtl NAME`` in the README's code blocks and code spans."""
    code = re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text)
    found = set()
    for snippet in code:
        found |= set(re.findall(r"(?:^|[\s/`])mtl ([a-z][\w-]*)", snippet, re.M))
    return found


def test_generated_blocks_are_in_sync():
    text = README.read_text()
    rendered, changed, missing = report.render(text)
    assert not missing, f"README.md has no markers for {missing}: add them and run `make report`"
    assert not changed, f"README.md blocks out of sync: {changed}; run `make report`"
    assert rendered == text


def test_check_option_names_a_stale_block(tmp_path, capsys, monkeypatch):
    stale = README.read_text().replace("<!-- report:scaling -->\n", "<!-- report:scaling -->\nX\n")
    copy = tmp_path / "README.md"
    copy.write_text(stale)
    monkeypatch.setattr(sys, "argv", ["report.py", "--check", "--readme", str(copy)])
    with pytest.raises(SystemExit) as exit_:
        report.main()
    assert exit_.value.code == 1
    assert "scaling" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["report.py", "--readme", str(copy)])
    report.main()  # rewrites only the blocks: the copy is the README again
    assert copy.read_text() == README.read_text()


def test_every_cli_command_is_documented_and_every_shown_one_exists():
    commands = set(report.cli_commands())
    text = README.read_text()
    # outside the generated CLI table, so each command has prose or an example of its own
    by_hand = report.BLOCK.sub("", text)
    shown = _shown_commands(by_hand)
    assert commands - shown == set(), (
        f"`mtl --help` commands without a README example: {commands - shown}"
    )
    assert shown - commands == set(), (
        f"README shows commands `mtl --help` lacks: {shown - commands}"
    )


def test_shown_commands_finds_blocks_and_spans():
    text = "run `mtl train x`\n```bash\n.venv/bin/mtl serve m\nmtl tune c  # x\n```\n`mtl` trains"
    assert _shown_commands(text) == {"train", "serve", "tune"}


def _dataclass_keys(cls, section: str, out: set) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            _dataclass_keys(kind, f"{section}.{f.name}", out)
        else:
            out.add((section, f.name))


def test_config_reference_covers_every_config_field():
    from mtl import config

    expected: set = set()
    for f in dataclasses.fields(config.Config):
        _dataclass_keys(typing.get_type_hints(config.Config)[f.name], f.name, expected)
    expected.add(("data.files.tasks.<name>", "kind"))  # FileTaskConfig, a dict's values
    parsed = {(f["section"], f["key"]) for f in report.config_fields()}
    assert expected - parsed == set(), (
        f"config fields missing from the reference: {expected - parsed}"
    )
    defaults = {(f["section"], f["key"]): f["default"] for f in report.config_fields()}
    assert defaults[("train", "epochs")] == str(config.TrainConfig().epochs)


def _grid_and_search(best_start: float, pick: float) -> dict:
    """A 2-key grid (uniform, each key x 0.25 and x 4) and a spread-start search of 2."""
    weights = [
        {"a": 0.5, "b": 0.5},  # uniform
        {"a": 0.2, "b": 0.8},
        {"a": 0.8, "b": 0.2},  # a's largest weight: the spread start's first point
        {"a": 0.75, "b": 0.25},
        {"a": 0.1, "b": 0.9},  # b's largest weight: its second point
    ]
    held = [1.0, 0.0, best_start, 0.0, best_start - 0.5]
    scores = [
        {"trial_id": f"x_{i:05d}", "weights": w, "select": h, "held_out": h}
        for i, (w, h) in enumerate(zip(weights, held, strict=True))
    ]
    grid = {"scores": scores, "best_trial": "x_00002", "trial_epochs": 15}
    return {"grid": grid, "search": {"best": pick, "trials": 2, "trial_epochs": 6}}


def test_pbt_own_gain_is_the_pick_minus_its_best_starting_point(tmp_path, monkeypatch):
    import json

    rows = [_grid_and_search(3.0, 3.5), _grid_and_search(2.0, 1.0)]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    out = report.pbt_own_gain(["r.json"], higher_is_better=True)
    assert out["gains"] == [0.5, -1.0]
    assert out["contains"] == 2 and out["seeds"] == 2
    # lower is better: the best start is the one with the lowest score, and signs flip
    low = report.pbt_own_gain(["r.json"], higher_is_better=False)
    assert low["gains"] == [-(3.5 - 2.5), -(1.0 - 1.5)]


def test_every_flag_the_readme_gives_a_command_exists():
    parser = report.cli_parser()
    subs = report._subcommands(parser)
    top = {s for a in parser._actions for s in a.option_strings}
    code = re.findall(r"```.*?```", README.read_text(), re.S)
    code += re.findall(r"`[^`\n]+`", README.read_text())
    unknown = []
    for snippet in code:
        for name, rest in re.findall(r"(?:^|[\s/`])mtl ([a-z][\w-]*)([^\n#`|]*)", snippet, re.M):
            if name not in subs:
                continue  # test_every_cli_command_... names it
            known = top | {s for a in subs[name]._actions for s in a.option_strings}
            flags = re.findall(r"(?<!\S)(--?[a-z][\w-]*)", rest)
            unknown += [f"mtl {name} {f}" for f in flags if f not in known]
    assert unknown == [], f"README gives flags the CLI does not have: {unknown}"

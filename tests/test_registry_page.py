"""The MLflow UI's page of a registered model, rendered by headless Chromium: it shows the
model's description, its identity tags and its aliases (benchmarks/registry_screenshot.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import registry_screenshot  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    registry_screenshot.chromium() is None,
    reason="needs headless Chromium: apt-get install chromium (Debian's package)",
)
def test_the_registry_page_shows_description_tags_and_aliases(tmp_path):
    uri, name = registry_screenshot.demo_store(tmp_path)
    shot = tmp_path / "page.png"
    result = registry_screenshot.check_page(uri, name, shot, registry_screenshot.chromium())
    assert result["missing"] == {}, result
    looked_for = result["looked_for"]
    assert {"alias candidate", "alias champion", "tag data_source", "tag input"} <= set(looked_for)
    assert looked_for["tag task_set"] == "tags: task_set left,right,semseg,depth,recon_left"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["screenshot_bytes"] > 20_000


def test_a_page_without_the_tags_is_reported_missing(tmp_path):
    """The check can fail: text that is not in a section is named as missing."""
    dom = (
        '<div data-testid="note-editor-preview-content"><h3>m: models</h3></div>'
        '<div data-testid="tags-section"><td>benchmark</td><td>multimnist</td></div>'
        '<div data-testid="model-version-table"><span>@ candidate</span></div>'
    )
    found = registry_screenshot.sections(dom)
    assert found["tags"].strip() == "benchmark multimnist" and "@ candidate" in found["aliases"]
    assert "task_set" not in found["tags"] and "@ champion" not in found["aliases"]

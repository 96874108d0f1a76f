"""The MTL_FAIL_* crash hooks are inert unless the test-only switch is set."""

from mtl.train.loop import _maybe_inject_failure


def test_crash_hook_ignored_without_the_test_switch(monkeypatch, tmp_path):
    marker = tmp_path / "crashed"
    monkeypatch.delenv("MTL_TEST_FAULTS", raising=False)
    monkeypatch.setenv("MTL_FAIL_AT_STEP", "3")
    monkeypatch.setenv("MTL_FAIL_MARKER", str(marker))
    _maybe_inject_failure(3)  # would os._exit(1) this test process if the hook were read
    assert not marker.exists()
    monkeypatch.setenv("MTL_TEST_FAULTS", "yes")  # only the exact value "1" turns it on
    _maybe_inject_failure(3)
    assert not marker.exists()


def test_crash_hook_spent_marker_is_respected(monkeypatch, tmp_path):
    marker = tmp_path / "crashed"
    marker.touch()  # a worker already crashed once: the restarted one must go on
    monkeypatch.setenv("MTL_TEST_FAULTS", "1")
    monkeypatch.setenv("MTL_FAIL_AT_STEP", "3")
    monkeypatch.setenv("MTL_FAIL_MARKER", str(marker))
    _maybe_inject_failure(3)
    assert marker.exists()

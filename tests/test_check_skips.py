"""`.ci/check_skips.py`, the skip gate of `.ci/run`: allowed reasons pass with their counts, any other fails,
including the skip a missing optional import (onnx) turns a test file into."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT / ".ci" / "check_skips.py"
ONNX_SKIP = "could not import 'onnx': No module named 'onnx'"


def _junit(path: Path, reasons: list[str]) -> Path:
    cases = "".join(f'<testcase classname="tests.test_x" name="test_{i}"><skipped type="pytest.skip" '
                    f'message="{r}">tests/test_x.py:1: {r}</skipped></testcase>' for i, r in enumerate(reasons))
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}'
                    f'<testcase classname="tests.test_x" name="test_ok"/></testsuite></testsuites>')
    return path


def _check(*reports) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECKER), *map(str, reports)], capture_output=True, text=True)


def test_allowed_skips_pass_and_are_printed_with_their_count(tmp_path):
    r = _check(_junit(tmp_path / "a.xml", ["needs libtpu: pip install -e '.[tpu]'"] * 2),
               _junit(tmp_path / "b.xml", []))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "allowed skip x2: needs libtpu: pip install -e '.[tpu]'" in r.stdout


def test_a_skip_reason_off_the_allow_list_fails(tmp_path):
    r = _check(_junit(tmp_path / "a.xml", ["needs libtpu: pip install -e '.[tpu]'", ONNX_SKIP]))
    assert r.returncode == 1
    assert f"UNEXPECTED skip x1: {ONNX_SKIP}" in r.stdout and "allowed skip x1: needs libtpu" in r.stdout


def test_a_missing_report_is_an_error_not_a_pass(tmp_path):
    assert _check(tmp_path / "absent.xml").returncode == 2


def test_pytest_with_onnx_uninstalled_fails_the_gate(tmp_path):
    """pytest runs tests/test_identity.py with `import onnx` failing (a sys.modules shim, as if the package were
    uninstalled): the file turns into a skip, which the gate must refuse."""
    report = tmp_path / "suite.xml"
    shim = ("import sys; sys.modules['onnx'] = None; import pytest; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_identity.py', '--junitxml', {str(report)!r}]))")
    run = subprocess.run([sys.executable, "-c", shim], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, timeout=300)
    # pytest itself does not fail: 5 = nothing ran here (the file's only tests skipped); in a full run, 0
    assert run.returncode in (0, 5) and "1 skipped" in run.stdout, run.stdout + run.stderr
    r = _check(report)
    assert r.returncode == 1, r.stdout
    assert "UNEXPECTED skip" in r.stdout and "onnx" in r.stdout, r.stdout

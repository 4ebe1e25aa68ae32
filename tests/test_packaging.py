"""What a wheel ships, checked without building one: every directory of Python modules under megatron_bliss/ is a
package that setup.py's find_packages call yields, and every data file there is declared in its package_data.
Also checks that the suite's leftover-process check (tests/conftest.py) fails a session that leaves a process behind.

``scripts/check_wheel.sh`` (run by CI) builds and installs the real wheel; these tests catch the same omissions in a
second, before any build.
"""

import glob
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import setuptools

from tests.conftest import LEAK_MARKER, REPO_ROOT

PACKAGE_DIR = os.path.join(REPO_ROOT, "megatron_bliss")
# built by build_ext or by Python itself, never shipped as package data
GENERATED = (".pyc", ".so", ".pyd")


@pytest.fixture(scope="module")
def setup_kwargs(monkeypatch_module):
    """The keyword arguments setup.py passes to ``setuptools.setup`` (the extension is not configured)."""
    captured = {}
    monkeypatch_module.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch_module.setenv("MEGATRON_BLISS_NO_EXT", "1")
    monkeypatch_module.chdir(REPO_ROOT)  # find_packages runs relative to the current directory
    runpy.run_path(os.path.join(REPO_ROOT, "setup.py"), run_name="__main__")
    assert captured, "setup.py did not call setuptools.setup"
    return captured


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _source_dirs() -> dict[str, list[str]]:
    """Directory (relative to the repository) -> its files, for every directory under megatron_bliss/."""
    out = {}
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        out[os.path.relpath(root, REPO_ROOT)] = sorted(files)
    return out


def _package_of(rel_dir: str, packages: set[str]) -> str | None:
    """The innermost package of ``packages`` containing directory ``rel_dir``."""
    parts = rel_dir.split(os.sep)
    while parts:
        name = ".".join(parts)
        if name in packages:
            return name
        parts.pop()
    return None


def test_every_module_directory_is_a_package(setup_kwargs):
    packages = set(setup_kwargs["packages"])
    module_dirs = {d.replace(os.sep, ".") for d, files in _source_dirs().items()
                   if any(f.endswith(".py") for f in files)}
    missing = sorted(module_dirs - packages)
    assert not missing, (f"setup.py: find_packages does not yield {missing}, so a wheel would lack their modules; "
                         f"give each directory an __init__.py")
    assert "megatron_bliss.data" in packages and len(packages) >= 5  # the walk saw the real tree


def test_every_data_file_is_declared_package_data(setup_kwargs):
    packages = set(setup_kwargs["packages"])
    package_data = setup_kwargs.get("package_data", {})
    declared = set()
    for name in packages:
        pkg_dir = os.path.join(REPO_ROOT, *name.split("."))
        for pattern in package_data.get(name, []) + package_data.get("", []):
            declared.update(os.path.normpath(p) for p in glob.glob(os.path.join(pkg_dir, pattern), recursive=True))
    data_files = [os.path.join(REPO_ROOT, d, f) for d, files in _source_dirs().items() for f in files
                  if not f.endswith((".py", *GENERATED))]
    undeclared = sorted(os.path.relpath(p, REPO_ROOT) for p in data_files if os.path.normpath(p) not in declared)
    assert not undeclared, f"setup.py: package_data does not declare {undeclared}, so a wheel would lack them"
    orphans = sorted(os.path.relpath(p, REPO_ROOT) for p in data_files
                     if _package_of(os.path.relpath(os.path.dirname(p), REPO_ROOT), packages) is None)
    assert not orphans, f"setup.py: {orphans} lie outside every package"
    # the default tokenizer, which megatron_bliss.data loads by path, is among the checked files
    assert os.path.join(REPO_ROOT, "megatron_bliss", "data", "assets", "default_bpe_8k.model") in data_files


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the leftover-process check reads /proc")
def test_leftover_process_check_fails_the_session(tmp_path):
    """A session whose test leaves a detached process running exits non-zero, naming the test and the process,
    and the process is killed."""
    (tmp_path / "test_leak.py").write_text(textwrap.dedent("""
        import subprocess

        def test_leaves_a_process():
            subprocess.Popen(["sleep", "300"], start_new_session=True)
    """))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, MEGATRON_BLISS_TEST_LEAK_GRACE_S="0.5")
    env.pop(LEAK_MARKER, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "test_leak.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 passed" in out and "leftover processes" in out, out
    line = next(x for x in out.splitlines() if "first seen after test_leak.py::test_leaves_a_process" in x)
    pid = int(line.split("pid ")[1].split()[0])
    assert line.endswith("sleep 300")
    status = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] if os.path.exists(f"/proc/{pid}") else "gone"
    assert status in ("gone", "Z"), f"pid {pid} still running ({status})"

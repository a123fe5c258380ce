"""A pytest plugin that fails the session when a test reads a file beside the repository.

A fresh clone has nothing beside it, so a test that reads a neighbouring folder (``../shared``, another checkout)
passes here and fails there. An audit hook (:func:`sys.addaudithook`) sees every ``open`` and directory listing of
the test process and records the ones that are

* under the repository's parent directory, inside an entry that existed there when the session started, other than
  the repository itself; or
* on a path with a ``/shared/`` component,

unless they are under a folder that belongs to the environment rather than to a neighbour: the Python installation
and its site-packages, the ``sys.path`` entries, pytest's temporary directory, the system temporary directory, and
the hidden folders of the home directory (``~/.cache`` and the like). Paths outside the parent directory (``/proc``,
``/usr``, ``/tmp`` when the repository is elsewhere) are never recorded. At the end of the session each recorded
read is listed with the test that made it, and the session fails.

The repository is pytest's ``rootdir``. Subprocesses started by tests are not watched (an audit hook lives in one
process). ``tests/conftest.py`` loads this plugin; ``python -m pytest -p outside_reads`` loads it elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import site
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: The audit events that read a file or a directory: their first argument is the path.
READ_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})

#: A path component that marks shared reference material, wherever it lies.
SHARED_COMPONENT = f"{os.sep}shared{os.sep}"


def _under(path: str, root: str) -> bool:
    """Whether the absolute path ``path`` is ``root`` or inside it (both normalized, no trailing separator)."""
    return path == root or path.startswith(root + os.sep)


@dataclass
class OutsideReadGuard:
    """The rule (which paths are outside) and the record (which test read them).

    Attributes:
        repo: the repository's absolute path.
        forbidden: absolute paths of the entries beside the repository when the guard was made.
        allowed: absolute roots that are never recorded (environment folders), even when forbidden.
        reads: ``(test id, path)`` of every recorded read, in order.
        current: the id of the test running now (``"collection"`` / ``"session"`` outside a test).
        active: whether reads are recorded (off after the session).
    """

    repo: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...]
    reads: list[tuple[str, str]] = field(default_factory=list)
    current: str = "session"
    active: bool = True

    @classmethod
    def for_repository(cls, repo: Path, basetemp: Path | None = None) -> OutsideReadGuard:
        """The guard of ``repo``: its neighbours now are forbidden; the environment's folders are allowed."""
        repo_path = os.path.abspath(repo)
        parent = os.path.dirname(repo_path)
        try:
            neighbours = sorted(os.listdir(parent))
        except OSError:
            neighbours = []
        forbidden = tuple(os.path.join(parent, name) for name in neighbours if os.path.join(parent, name) != repo_path)
        return cls(repo_path, forbidden, _environment_roots(repo_path, basetemp))

    def is_outside(self, path: str) -> bool:
        """Whether reading the absolute path ``path`` is a read outside the repository."""
        if _under(path, self.repo) or any(_under(path, root) for root in self.allowed):
            return False
        return SHARED_COMPONENT in path + os.sep or any(_under(path, root) for root in self.forbidden)

    def audit(self, event: str, args: tuple) -> None:
        """The audit hook: records a read event whose path is outside. Must not open files itself."""
        if not self.active or event not in READ_EVENTS or not args:
            return
        target = args[0]
        if isinstance(target, int):  # a file descriptor: its path was checked when it was opened
            return
        if target is None:  # os.listdir() / os.scandir() of the current directory
            target = "."
        try:
            path = os.path.abspath(os.fsdecode(target))
        except (TypeError, ValueError):
            return
        if self.is_outside(path):
            self.reads.append((self.current, path))


def _environment_roots(repo: str, basetemp: Path | None) -> tuple[str, ...]:
    """Folders that belong to the environment: reading them is not reading a neighbour of the repository.

    A folder that contains the repository (say ``sys.path`` holds the parent directory) is left out, as it would
    allow everything beside the repository.
    """
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        *sysconfig.get_paths().values(),
        *site.getsitepackages(),
        site.getusersitepackages(),
        *(entry for entry in sys.path if entry),
        tempfile.gettempdir(),
        os.environ.get("XDG_CACHE_HOME", ""),
    ]
    if basetemp is not None:
        candidates.append(str(basetemp))
    home = Path.home()
    with contextlib.suppress(OSError):
        candidates += [str(home / name) for name in os.listdir(home) if name.startswith(".")]
    roots = {os.path.abspath(path) for path in candidates if path}
    return tuple(sorted(root for root in roots if not _under(repo, root)))


_GUARD_KEY = pytest.StashKey[OutsideReadGuard]()


@pytest.hookimpl(trylast=True)  # after the tmp_path plugin has set up its factory
def pytest_configure(config: pytest.Config) -> None:
    basetemp = config.option.basetemp
    guard = OutsideReadGuard.for_repository(config.rootpath, Path(basetemp) if basetemp else None)
    # pytest's own temporary root (``/tmp/pytest-of-USER`` unless --basetemp is given) is environment too.
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None and basetemp is None:
        guard.allowed += (os.path.abspath(factory.getbasetemp().parent),)
    config.stash[_GUARD_KEY] = guard
    sys.addaudithook(guard.audit)  # an audit hook cannot be removed: the guard switches itself off at the end


def pytest_collectstart(collector: pytest.Collector) -> None:
    collector.config.stash[_GUARD_KEY].current = "collection"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    guard = item.config.stash[_GUARD_KEY]
    guard.current = item.nodeid
    try:
        return (yield)
    finally:
        guard.current = "session"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    guard = session.config.stash[_GUARD_KEY]
    guard.active = False
    if guard.reads and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    guard = config.stash[_GUARD_KEY]
    if not guard.reads:
        return
    terminalreporter.section("reads outside the repository", sep="=", red=True, bold=True)
    terminalreporter.write_line(f"a fresh clone has nothing beside it; these reads leave {guard.repo}:")
    for test, path in dict.fromkeys(guard.reads):
        terminalreporter.write_line(f"{test}: {path}")

"""What a person sees: the project's own lines on the console, everything else in a log file.

:func:`capture` (used by the CLI) sends the process's stdout and stderr, at the file-descriptor
level too (Ray's C++ core, the raylet, torch), and every logger but ``smpp_ray``'s to a log file,
and keeps on the console only:

- ``smpp_ray`` log records of this process (stage lines, results), as ``HH:MM:SS message``;
- lines :func:`line` emits anywhere, including inside Ray workers (a Train worker's epoch line):
  a worker prints them with :data:`MARK`, Ray forwards worker output to the driver, and the
  driver's stream picks marked lines out of it and shows them without Ray's prefix.

``-v`` (``verbose``) keeps everything on the console as before. Tests and library users that never
call :func:`capture` see plain logging; :func:`line` then just logs.

Both destinations pass through :func:`smpp_ray.redact.redact_uri`: a tracking URI with a password
(``http://user:PASSWORD@mlflow``) never reaches the console or the log, whether a record's message,
its traceback, or a library's print carries it. The log file is created 0600 (owner only): what
runs in native code (the fd-level redirection) cannot be filtered.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import IO

from smpp_ray.redact import redact_uri

logger = logging.getLogger(__name__)

#: Marks a project line in a Ray worker's output, so the driver can show it.
MARK = "[smpp] "
_ACTIVE: _Capture | None = None


def details(name: str) -> logging.Logger:
    """A module's logger for lines that belong in the log file but not on the console (what a
    later line sums up, or what only a debugging reader needs): ``smpp.details.<module>``."""
    return logging.getLogger(f"smpp.details.{name}")


def line(message: str) -> None:
    """A progress line for the person running the job (an epoch, a trial, a stage).

    On the driver it is a ``smpp_ray`` log record (console + log file); in a Ray worker it is
    printed with :data:`MARK`, which the driver's captured stream shows on its console.
    """
    if _ACTIVE is not None or not _in_ray_worker():
        logger.info("%s", message)
        return
    # Not print(): Ray Train patches it in its workers to also log, which would show the line twice.
    sys.stderr.write(f"{MARK}{time.strftime('%H:%M:%S')} {message}\n")
    sys.stderr.flush()


def out(text: str) -> None:
    """Text that is the command's result (a table, a summary): on standard output (progress lines
    are on standard error, so ``smpp predict ... > summary.json`` keeps the result alone), and in
    the log."""
    target = _ACTIVE.result if _ACTIVE is not None else sys.stdout
    target.write(text if text.endswith("\n") else text + "\n")
    target.flush()
    if _ACTIVE is not None:
        _ACTIVE.log.write(text if text.endswith("\n") else text + "\n")


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # no runtime context: not a worker
        return False


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return redact_uri(f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {text}")


class _LogFormatter(logging.Formatter):
    """The log file's lines, tracebacks included, with credentials in URIs redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_uri(super().format(record))


def _open_private(path: str) -> IO[str]:
    """Append to ``path``, created (or narrowed to) 0600: it may hold locations and errors."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115


class _Router(io.TextIOBase):
    """A text stream that writes everything to the log and marked lines also to the console."""

    def __init__(self, log: IO[str], console: IO[str]) -> None:
        self.log, self.console, self._pending = log, console, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        length = len(text)
        text = redact_uri(text)  # libraries print locations too (MLflow's "View run ... at")
        self.log.write(text)
        self._pending += text
        while "\n" in self._pending:
            current, self._pending = self._pending.split("\n", 1)
            at = current.find(MARK)
            if at >= 0:
                self.console.write(current[at + len(MARK):] + "\n")
                self.console.flush()
        return length

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return False


class _Capture:
    def __init__(self, log_path: str, console: IO[str], result: IO[str]) -> None:
        self.log_path = log_path
        self.console = console  # progress: standard error
        self.result = result    # the command's result: standard output
        self.log = _open_private(log_path)
        self.file_handler: logging.StreamHandler | None = None
        self.routers: list[_Router] = []
        self.redirected_fds: list[int] = []

    def switch_log(self, log: IO[str]) -> IO[str]:
        """Send everything that went to the log file to ``log`` instead; returns the previous one."""
        previous = self.log
        for stream in (sys.stdout, sys.stderr, previous):
            stream.flush()
        self.log = log
        if self.file_handler is not None:
            self.file_handler.setStream(log)
        for router in self.routers:
            router.log = log
        for fd in self.redirected_fds:
            os.dup2(log.fileno(), fd)
        return previous


@contextlib.contextmanager
def capture(log_path: str, *, verbose: bool = False) -> Iterator[str]:
    """Route this process's output as the module docstring says, for the ``with`` block; yields
    the log file's path. Everything is restored afterwards (the CLI runs many times in one test
    process)."""
    global _ACTIVE
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    # Ray folds similar worker lines from several processes into one, later: the console shows
    # only the project's lines anyway, and each must arrive when it is printed.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    console, result = sys.stderr, sys.stdout
    state = _Capture(log_path, console, result)
    root = logging.getLogger()
    project = logging.getLogger("smpp_ray")
    file_handler = logging.StreamHandler(state.log)
    file_handler.setFormatter(_LogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console_handler = logging.StreamHandler(console)
    console_handler.setFormatter(_ConsoleFormatter())
    saved = {"stdout": sys.stdout, "stderr": sys.stderr, "root_level": root.level,
             "project_level": project.level, "propagate": project.propagate}
    saved_fds: list[tuple[int, int]] = []
    state.file_handler = file_handler
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    if verbose:
        root.addHandler(console_handler)
        root.setLevel(logging.DEBUG)
    else:
        project.addHandler(console_handler)
        project.setLevel(logging.INFO)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):  # native writers (Ray's core, raylet messages, torch) go to the log too
            try:
                saved_fds.append((fd, os.dup(fd)))
                os.dup2(state.log.fileno(), fd)
                state.redirected_fds.append(fd)
            except OSError:
                continue
        # Streams that were fd 1 / fd 2 themselves must keep reaching the terminal, not the log.
        originals = dict(saved_fds)
        if _writes_to_fd(result, 1) and 1 in originals:
            state.result = os.fdopen(os.dup(originals[1]), "w", buffering=1)
        if _writes_to_fd(console, 2) and 2 in originals:
            state.console = os.fdopen(os.dup(originals[2]), "w", buffering=1)
            console_handler.setStream(state.console)
        state.routers = [_Router(state.log, state.console), _Router(state.log, state.console)]
        sys.stdout, sys.stderr = state.routers
    _ACTIVE = state
    ray_was_up = _ray_is_up()
    try:
        yield log_path
    finally:
        if not ray_was_up and _ray_is_up():
            # A Ray this command started stops here, while its last messages still go to the log.
            import ray

            ray.shutdown()
        _ACTIVE = None
        sys.stdout, sys.stderr = saved["stdout"], saved["stderr"]
        for fd, copy in saved_fds:
            os.dup2(copy, fd)
            os.close(copy)
        root.removeHandler(file_handler)
        root.removeHandler(console_handler)
        project.removeHandler(console_handler)
        root.setLevel(saved["root_level"])
        project.setLevel(saved["project_level"])
        if state.console is not saved["stderr"]:
            state.console.close()
        if state.result is not saved["stdout"]:
            state.result.close()
        state.log.close()


def stage_log_path(log_path: str, stage: str) -> str:
    """A pipeline stage's own log beside the command's: ``<logs>/<stage>.log`` for a pipeline's
    ``logs/pipeline.log``, ``<logs>/<stem>.<stage>.log`` in the shared cache folder."""
    folder, stem = os.path.dirname(log_path), os.path.splitext(os.path.basename(log_path))[0]
    return os.path.join(folder, f"{stage}.log" if stem == "pipeline" else f"{stem}.{stage}.log")


@contextlib.contextmanager
def stage_log(stage: str) -> Iterator[str | None]:
    """While a pipeline stage runs, the library output (Ray, MLflow, torch, other loggers) goes to
    the stage's own log file (:func:`stage_log_path`); the project's lines stay on the console and
    in the command's log. Yields the file's path (None without :func:`capture`: nothing to route).
    A failing stage names its log, since that is where the library's account of it is."""
    state = _ACTIVE
    if state is None:
        yield None
        return
    path = stage_log_path(state.log_path, stage)
    log = _open_private(path)
    previous = state.switch_log(log)
    # The project's own records stay in the command's log as well, so it reads as the run's story.
    project_lines = logging.StreamHandler(previous)
    project_lines.setFormatter(state.file_handler.formatter if state.file_handler else None)
    project = logging.getLogger("smpp_ray")
    project.addHandler(project_lines)
    try:
        yield path
    except BaseException:
        logger.error("stage %s failed; its library output is in %s", stage, path)
        raise
    finally:
        project.removeHandler(project_lines)
        state.switch_log(previous)
        log.close()
        # The command's log still tells where each stage's details went.
        previous.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} stage {stage}: library output in {path}\n")


def _ray_is_up() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _writes_to_fd(stream: IO[str], fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def log_location(command: str, out: str | None, *, pipeline_root: bool = False) -> str:
    """Where a command's log goes: ``<pipeline>/logs/<command>.log`` when ``out`` is a pipeline
    folder, else ``logs/<command>.log`` *beside* the output (never inside a stage's folder: its
    files are the next stage's fingerprinted input); this node's cache for a URI."""
    from smpp_ray import storage

    if out and not storage.is_uri(out):
        folder = storage.normalize(out)
        if not pipeline_root:
            folder = os.path.dirname(folder.rstrip(os.sep)) or folder
        return os.path.join(folder, "logs", f"{command}.log")
    return os.path.join(storage.cache_root(), "logs", f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log")


def published_log_location(command: str, out: str | None, *, pipeline_root: bool = False) -> str | None:
    """Where the log of a command whose output is a URI is copied when it ends (the same place
    :func:`log_location` uses for a local output), so it outlives the node that wrote it."""
    from smpp_ray import storage

    if not out or not storage.is_uri(out):
        return None
    folder = storage.normalize(out)
    if not pipeline_root:
        folder = storage.parent(folder)
    return storage.join(folder, "logs", f"{command}.log")


def publish_log(log_path: str, target: str) -> None:
    """Copy the node-local log to the run's storage; a failure to do so never fails the run."""
    from smpp_ray import storage

    try:
        with open(log_path, "rb") as log:
            storage.write_bytes(target, log.read())
    except (OSError, ValueError) as err:
        sys.stderr.write(f"could not copy the log {log_path} to {target}: {err}\n")

"""Running the package's commands as a user would, and checking what they leave behind.

- `run_command`: the real `lm-eval-spade` or `lm_eval` executable in a subprocess
  (`run_interrupted`: the same, with Ctrl-C once its output shows a given line);
- `run_spade_cli`: `lm_eval_spade.cli.main` in this process, which is what the
  `lm-eval-spade` executable calls (its entry point), with its output captured;
- `run_lm_eval_model`: the `lm_eval` command up to the model, in this process: lm-eval's
  own parser (`HarnessCLI`) and config (`EvaluatorConfig.from_cli`), then the model built
  as `simple_evaluate` builds it, under the same error handling as the command
  (`cli_errors.guarded`). It skips what comes first in the real command and cannot fail
  on these inputs (lm-eval indexing all its task folders, ~8 s each time);
- `snapshot` / `changes`: every file under some folders, to prove a command touched
  nothing but its output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Outcome:
    status: int
    output: str  # stdout, stderr and log lines together

    @property
    def error_lines(self) -> list[str]:
        """The lines that end a command: an error, or Ctrl-C's."""
        return [
            line
            for line in self.output.splitlines()
            if ": error: " in line or re.match(r"^[\w -]+: interrupted\b", line)
        ]


def command_env(**extra: str | None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE}
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_command(
    program: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout=600
) -> Outcome:
    """The real executable (`lm-eval-spade`, `lm_eval`) of this environment."""
    done = subprocess.run(
        [str(BIN / program), *argv],
        cwd=cwd,
        env=env or command_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Outcome(done.returncode, done.stdout + done.stderr)


@contextlib.contextmanager
def _captured(cwd: Path, env: dict[str, str | None]) -> Iterator[io.StringIO]:
    """Output, logs, working folder and environment as a fresh command would have them."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved_env = {k: os.environ.get(k) for k in env}
    old_cwd = Path.cwd()
    root.handlers, root.level = [handler], logging.INFO
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        os.chdir(old_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        root.handlers, root.level = saved_handlers, saved_level


def _in_process(run: Callable[[], Any], cwd: Path, env: dict[str, str | None]) -> Outcome:
    """`run()` as a command: SystemExit is its status; any other exception is a
    traceback in the output, as Python would print it."""
    status = 0
    with _captured(cwd, env) as buffer:
        try:
            run()
        except SystemExit as done:
            if isinstance(done.code, str):
                print(done.code, file=sys.stderr)
                status = 1
            else:
                status = done.code or 0
        except Exception:
            traceback.print_exc(file=sys.stderr)
            status = 1
    return Outcome(status, buffer.getvalue())


def run_spade_cli(argv: list[str], cwd: Path, env: dict[str, str | None] | None = None) -> Outcome:
    from lm_eval_spade.cli import main

    return _in_process(lambda: main(argv), cwd, env or {})


def lm_eval_model(argv: list[str], then: Callable[[Any], Any] | None = None) -> Any:
    """What `lm_eval ARGV` does up to its model (see the module doc), then `then(lm)`."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.api.registry import get_model
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from lm_eval_spade._startup.cli_errors import guarded

    sys.argv = ["lm_eval", *argv]
    args = HarnessCLI().parse_args()
    cfg = EvaluatorConfig.from_cli(args)

    def build() -> Any:
        lm = get_model(cfg.model).create_from_arg_obj(
            cfg.model_args,
            {"batch_size": cfg.batch_size, "max_batch_size": cfg.max_batch_size,
             "device": cfg.device},
        )  # fmt: skip
        return then(lm) if then is not None else lm

    return guarded(build)


def run_lm_eval_model(
    argv: list[str],
    cwd: Path,
    then: Callable[[Any], Any] | None = None,
    env: dict[str, str | None] | None = None,
) -> Outcome:
    saved = sys.argv
    try:
        return _in_process(lambda: lm_eval_model(argv, then), cwd, env or {})
    finally:
        sys.argv = saved


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under `roots`."""
    files = {}
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def changes(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], allowed: list[Path]
) -> list[str]:
    """Files added, removed or modified, outside the `allowed` paths."""
    keep = [str(p) for p in allowed]

    def inside(name: str) -> bool:
        return any(name == k or name.startswith(k + os.sep) for k in keep)

    names = set(before) | set(after)
    return sorted(n for n in names if before.get(n) != after.get(n) and not inside(n))


def run_interrupted(
    program: str, argv: list[str], cwd: Path, at: str, env: dict[str, str] | None = None
) -> Outcome:
    """The real executable, sent SIGINT (Ctrl-C) once its output matches the regex `at`."""
    proc = subprocess.Popen(
        [str(BIN / program), *argv],
        cwd=cwd,
        env=env or command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen = b""
    while not re.search(at, seen.decode(errors="replace")):
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:  # it ended first: the outcome says how
            break
        seen += chunk
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=600)
    return Outcome(proc.returncode, (seen + rest).decode(errors="replace"))

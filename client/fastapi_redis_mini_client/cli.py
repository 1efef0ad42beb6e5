"""frm-client: the task service from a shell, with JSON on stdout and exit codes to branch on.

The service's URL comes from --url or FRM_URL, its API key from FRM_API_KEY only, so the key
stays out of the shell history and the process list. Every error, usage errors included, goes
to stderr as one line of {"error": {"code", "message", ...}}, and every failure has an exit
code of its own: no traceback, and never 1 (a FAILED task) by accident.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

from ._core import RetryPolicy
from .client import DEFAULT_URL, Client
from .errors import (
    APIError,
    ClientClosedError,
    PoolTimeoutError,
    ServerError,
    ServiceUnreachableError,
    TaskCancelledError,
    TaskExpiredError,
    TaskFailedError,
    TaskNotFoundError,
    UnexpectedResponseError,
    WaitTimeoutError,
)
from .models import Priority, Schedule, Task, TaskStatus


class Exit(IntEnum):
    """The exit codes, documented in --help and the README."""

    OK = 0  # done; for wait and run: the task is DONE
    TASK_FAILED = 1
    USAGE = 2  # bad arguments or environment (argparse uses 2 as well)
    TASK_CANCELLED = 3
    TASK_EXPIRED = 7  # not started by its --deadline; it never ran
    NOT_FOUND = 4  # no such task (or it belongs to another API key)
    REFUSED = 5  # the service refused the request: 401, 409 (already final), 413, 415, 422
    UNAVAILABLE = 6  # no answer, 429 or 5xx after every retry, or not the service's answer
    INTERNAL = 70  # a defect of this command (EX_SOFTWARE)
    TIMEOUT = 124  # wait or run: not final within --timeout (as timeout(1))
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
    OUTPUT_CLOSED = 141  # stdout closed early, e.g. by `| head` (128 + SIGPIPE)


EPILOG = """\
environment:
  FRM_URL       the api's base URL when --url is not given (default %(default_url)s)
  FRM_API_KEY   the API key, sent as Authorization: Bearer KEY

exit codes:
  0    success; for wait and run, the task is DONE
  1    the task FAILED (wait, run)
  2    usage error: bad arguments, --params not a JSON object
  3    the task was CANCELLED (wait, run)
  4    no such task
  5    the service refused the request (401, 409 already final, 413, 415, 422)
  6    the service was unreachable or unavailable (429, 5xx) after every retry,
       or what answered is not the service
  7    the task EXPIRED: not started by its --deadline (wait, run)
  70   a defect of frm-client itself (please report it)
  124  the task was not final within --timeout (wait, run)
  130  interrupted (Ctrl-C); a submitted task goes on running, and its id is in
       the error's task_id
  141  stdout was closed before the output was written

wait and run print the task on stdout when it ends FAILED, CANCELLED or EXPIRED or is not
final in time, and the error on stderr.
"""


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        return _main(argv, environ)
    except _UsageError as error:
        return _fail(Exit.USAGE, "usage", str(error))
    except KeyboardInterrupt:
        return _fail(Exit.INTERRUPTED, "interrupted", "stopped by the user")
    except BrokenPipeError:
        # Nothing more can be written to stdout; point it at /dev/null so that Python's own
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(Exit.OUTPUT_CLOSED)
    except Exception as error:  # a defect here: still one JSON line and its own exit code
        return _fail(Exit.INTERNAL, "internal", f"{type(error).__name__}: {error}")


def _main(argv: Sequence[str] | None, environ: Mapping[str, str]) -> int:
    args = _parser(environ).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    retry = RetryPolicy(attempts=args.attempts)
    try:
        client = Client(args.url, environ.get("FRM_API_KEY") or "", retry=retry)
    except ValueError as error:
        raise _UsageError(f"--url: {error}") from None
    submitted: list[Task] = []
    with client:
        try:
            return int(args.command(client, args, submitted.append))
        except WaitTimeoutError as error:
            if error.task is not None:
                _print(error.task.to_json())
            return _fail(Exit.TIMEOUT, "wait_timeout", str(error))
        except TaskFailedError as error:  # run
            _print(error.task.to_json())
            return _fail(Exit.TASK_FAILED, "task_failed", str(error))
        except TaskCancelledError as error:  # run
            _print(error.task.to_json())
            return _fail(Exit.TASK_CANCELLED, "task_cancelled", str(error))
        except TaskExpiredError as error:  # run
            _print(error.task.to_json())
            return _fail(Exit.TASK_EXPIRED, "task_expired", str(error))
        except APIError as error:
            return _fail(_exit_of(error), error.code, error.message, status=error.status_code)
        except (ServiceUnreachableError, PoolTimeoutError, ClientClosedError) as error:
            return _fail(Exit.UNAVAILABLE, "unreachable", str(error))
        except UnexpectedResponseError as error:
            return _fail(Exit.UNAVAILABLE, "unexpected_response", str(error))
        except KeyboardInterrupt:
            more = {"task_id": submitted[0].task_id} if submitted else {}
            return _fail(Exit.INTERRUPTED, "interrupted", "stopped by the user", **more)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, with its complaints as the JSON error line every other failure uses."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def _exit_of(error: APIError) -> Exit:
    if isinstance(error, TaskNotFoundError):
        return Exit.NOT_FOUND
    if error.status_code == 404:  # a path the service does not serve: not the service's api
        return Exit.UNAVAILABLE
    if error.retryable or isinstance(error, ServerError):
        return Exit.UNAVAILABLE
    return Exit.REFUSED


Submitted = Callable[[Task], None]


def _submit(client: Client, args: argparse.Namespace, _: Submitted) -> Exit:
    task = client.submit(args.prompt, args.params, args.idempotency_key, schedule=_schedule(args))
    _print(task.to_json())
    return Exit.OK


def _get(client: Client, args: argparse.Namespace, _: Submitted) -> Exit:
    _print(client.get(args.task_id).to_json())
    return Exit.OK


def _wait(client: Client, args: argparse.Namespace, _: Submitted) -> Exit:
    task = client.wait(args.task_id, args.timeout)
    _print(task.to_json())
    return _exit_of_task(task)


def _watch(client: Client, args: argparse.Namespace, _: Submitted) -> Exit:
    task = None
    for event in client.events(args.task_id, args.last_event_id, timeout=args.timeout):
        _print(event.to_json())
        sys.stdout.flush()  # a line as soon as its event comes, even into a pipe
        task = event.task
    return Exit.OK if task is None else _exit_of_task(task)


def _cancel(client: Client, args: argparse.Namespace, _: Submitted) -> Exit:
    _print(client.cancel(args.task_id).to_json())
    return Exit.OK


def _run(client: Client, args: argparse.Namespace, submitted: Submitted) -> Exit:
    result = client.run(
        args.prompt, args.params, args.timeout, args.idempotency_key, on_submit=submitted,
        schedule=_schedule(args),
    )  # fmt: skip
    _print(result)
    return Exit.OK


def _exit_of_task(task: Task) -> Exit:
    if task.status is TaskStatus.FAILED:
        return Exit.TASK_FAILED
    if task.status is TaskStatus.CANCELLED:
        return Exit.TASK_CANCELLED
    if task.status is TaskStatus.EXPIRED:
        return Exit.TASK_EXPIRED
    return Exit.OK


def _schedule(args: argparse.Namespace) -> Schedule:
    return Schedule(
        priority=args.priority,
        delay_seconds=args.delay,
        run_at=args.run_at,
        deadline_seconds=args.deadline,
    )


def _params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"duration\": 2}'")
    return value


def _task_id(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def _attempts(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _client_version() -> str:
    try:
        return version("fastapi-redis-mini-client")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _shared_options(
    parser: argparse.ArgumentParser, default_url: str, attempts: Any, verbose: Any
) -> None:
    """--url, --attempts and -v; a command's own copy has SUPPRESS defaults, so it sets them
    only when given after the command."""
    url_default = default_url if attempts is not argparse.SUPPRESS else argparse.SUPPRESS
    parser.add_argument("--url", default=url_default, help=f"the api (now {default_url})")
    parser.add_argument(
        "--attempts",
        type=_attempts,
        default=attempts,
        help="requests in all, retries included, for 503, 429 and connection errors "
        f"(default {RetryPolicy().attempts})",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=verbose, help="log each retry to stderr"
    )


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    default_url = environ.get("FRM_URL") or DEFAULT_URL
    parser = _Parser(
        prog="frm-client",
        description="Submit, read, wait for and cancel tasks of a fastapi-redis-mini service.",
        epilog=EPILOG % {"default_url": DEFAULT_URL},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_client_version()}")
    # The shared options are accepted before or after the command; given after it, they win.
    _shared_options(parser, default_url, RetryPolicy().attempts, False)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(
        name: str,
        handler: Callable[[Client, argparse.Namespace, Submitted], Exit],
        help_text: str,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
        )
        _shared_options(sub, default_url, argparse.SUPPRESS, argparse.SUPPRESS)
        sub.set_defaults(command=handler)
        return sub

    for name, handler, help_text in (
        ("submit", _submit, "queue a task; prints the task (DONE at once on a cache hit)"),
        (
            "run",
            _run,
            "submit and wait; prints the result, exit 1 if FAILED, 3 if CANCELLED, 7 if EXPIRED",
        ),
    ):
        sub = command(name, handler, help_text)
        sub.add_argument("prompt")
        sub.add_argument(
            "--params", type=_params, default=None, help="handler options, a JSON object"
        )
        sub.add_argument(
            "--idempotency-key", help="repeat a submit safely (one is made when absent)"
        )
        sub.add_argument(
            "--priority", choices=[p.value for p in Priority], help="its lane (default normal)"
        )
        sub.add_argument("--delay", type=_seconds, help="start no sooner than this many seconds")
        sub.add_argument(
            "--run-at", help="start no sooner than this time, ISO 8601 with a time zone"
        )
        sub.add_argument(
            "--deadline", type=_seconds, help="seconds from when it is due to start, or EXPIRED"
        )
    command("get", _get, "print a task's current state").add_argument("task_id", type=_task_id)
    wait = command("wait", _wait, "wait until the task is final; prints it, exit by its status")
    wait.add_argument("task_id", type=_task_id)
    watch = command(
        "watch", _watch, "print the task's events as JSON lines until it ends; exit by its status"
    )
    watch.add_argument("task_id", type=_task_id)
    watch.add_argument("--last-event-id", help="resume after this event's id")
    command("cancel", _cancel, "cancel a task; prints it").add_argument("task_id", type=_task_id)
    for sub in (wait, watch, commands.choices["run"]):
        sub.add_argument(
            "--timeout",
            type=_seconds,
            default=None,
            help="seconds to wait at most; exit 124 when not final by then (default: no limit)",
        )
    return parser


def _print(value: Any) -> None:
    sys.stdout.write(json.dumps(value) + "\n")


def _fail(code: Exit, error_code: str, message: str, **more: Any) -> int:
    line = json.dumps({"error": {"code": error_code, "message": message, **more}})
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except OSError:  # stderr closed as well: the exit code is all that is left
        pass
    return int(code)

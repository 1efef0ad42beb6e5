"""frm-client: the task service from a shell, with JSON on stdout and exit codes to branch on.

The service's URL comes from --url or FRM_URL, its API key from FRM_API_KEY only, so the key
stays out of the shell history and the process list. Errors go to stderr as
{"error": {"code", "message", ...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum
from typing import Any

from ._core import RetryPolicy
from .client import DEFAULT_URL, Client
from .errors import (
    APIError,
    NotFoundError,
    ServerError,
    ServiceUnreachableError,
    TaskCancelledError,
    TaskFailedError,
    UnexpectedResponseError,
    WaitTimeoutError,
)
from .models import Task, TaskStatus


class Exit(IntEnum):
    """The exit codes, documented in --help and the README."""

    OK = 0  # done; for wait and run: the task is DONE
    TASK_FAILED = 1
    USAGE = 2  # bad arguments or environment (argparse uses 2 as well)
    TASK_CANCELLED = 3
    NOT_FOUND = 4  # no such task (or it belongs to another API key)
    REFUSED = 5  # the service refused the request: 401, 409 (already final), 413, 415, 422
    UNAVAILABLE = 6  # no answer, 429 or 5xx after every retry, or not the service's answer
    TIMEOUT = 124  # wait or run: not final within --timeout (as timeout(1))
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


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
  124  the task was not final within --timeout (wait, run)
  130  interrupted (Ctrl-C); a submitted task goes on running
"""


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = _parser(environ).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    retry = RetryPolicy(attempts=args.attempts)
    with Client(args.url, environ.get("FRM_API_KEY") or None, retry=retry) as client:
        try:
            return int(args.command(client, args))
        except WaitTimeoutError as error:
            if error.task is not None:
                _print(error.task.to_json())
            return _fail(Exit.TIMEOUT, "wait_timeout", str(error))
        except TaskFailedError as error:  # run
            task = error.task.to_json()
            return _fail(Exit.TASK_FAILED, "task_failed", str(error), task=task)
        except TaskCancelledError as error:  # run
            task = error.task.to_json()
            return _fail(Exit.TASK_CANCELLED, "task_cancelled", str(error), task=task)
        except APIError as error:
            return _fail(_exit_of(error), error.code, error.message, status=error.status_code)
        except ServiceUnreachableError as error:
            return _fail(Exit.UNAVAILABLE, "unreachable", str(error))
        except UnexpectedResponseError as error:
            return _fail(Exit.UNAVAILABLE, "unexpected_response", str(error))
        except KeyboardInterrupt:
            return _fail(Exit.INTERRUPTED, "interrupted", "stopped by the user")


def _exit_of(error: APIError) -> Exit:
    if isinstance(error, NotFoundError):
        return Exit.NOT_FOUND
    if error.retryable or isinstance(error, ServerError):
        return Exit.UNAVAILABLE
    return Exit.REFUSED


def _submit(client: Client, args: argparse.Namespace) -> Exit:
    _print(client.submit(args.prompt, args.params, args.idempotency_key).to_json())
    return Exit.OK


def _get(client: Client, args: argparse.Namespace) -> Exit:
    _print(client.get(args.task_id).to_json())
    return Exit.OK


def _wait(client: Client, args: argparse.Namespace) -> Exit:
    task = client.wait(args.task_id, args.timeout)
    _print(task.to_json())
    return _exit_of_task(task)


def _cancel(client: Client, args: argparse.Namespace) -> Exit:
    _print(client.cancel(args.task_id).to_json())
    return Exit.OK


def _run(client: Client, args: argparse.Namespace) -> Exit:
    _print(client.run(args.prompt, args.params, args.timeout, args.idempotency_key))
    return Exit.OK


def _exit_of_task(task: Task) -> Exit:
    if task.status is TaskStatus.FAILED:
        return Exit.TASK_FAILED
    if task.status is TaskStatus.CANCELLED:
        return Exit.TASK_CANCELLED
    return Exit.OK


def _params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"duration\": 2}'")
    return value


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


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    default_url = environ.get("FRM_URL") or DEFAULT_URL
    parser = argparse.ArgumentParser(
        prog="frm-client",
        description="Submit, read, wait for and cancel tasks of a fastapi-redis-mini service.",
        epilog=EPILOG % {"default_url": DEFAULT_URL},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=default_url, help=f"the api (now {default_url})")
    parser.add_argument(
        "--attempts",
        type=_attempts,
        default=RetryPolicy().attempts,
        help="requests in all, retries included, for 503, 429 and connection errors "
        "(default %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each retry to stderr")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[Client, argparse.Namespace], Exit], help_text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(command=handler)
        return sub

    for name, handler, help_text in (
        ("submit", _submit, "queue a task; prints the task (DONE at once on a cache hit)"),
        ("run", _run, "submit and wait; prints the result, exit 1 if FAILED, 3 if CANCELLED"),
    ):
        sub = command(name, handler, help_text)
        sub.add_argument("prompt")
        sub.add_argument(
            "--params", type=_params, default=None, help="handler options, a JSON object"
        )
        sub.add_argument(
            "--idempotency-key", help="repeat a submit safely (one is made when absent)"
        )
    command("get", _get, "print a task's current state").add_argument("task_id")
    wait = command("wait", _wait, "wait until the task is final; prints it, exit by its status")
    wait.add_argument("task_id")
    command("cancel", _cancel, "cancel a task; prints it").add_argument("task_id")
    for sub in (wait, commands.choices["run"]):
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
    sys.stderr.write(json.dumps({"error": {"code": error_code, "message": message, **more}}))
    sys.stderr.write("\n")
    return int(code)

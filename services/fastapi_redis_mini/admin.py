"""Operator commands: `python -m fastapi_redis_mini.admin dead-letter list|replay`.

dead-letter list [--count N]          show dead-lettered tasks with their errors
dead-letter replay ENTRY_ID ...       put those tasks back on the stream
dead-letter replay --all              put every dead-lettered task back
stats                                 stream length, lag, pending and dead letters
webhooks dead-letter [--count N]      show webhook deliveries that failed for good, newest first
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

import orjson

from .core.queue import QueueUnavailable
from .core.redis import RedisTaskQueue, connect
from .core.settings import load_settings_or_exit

_ALL_AT_ONCE = 10_000


async def _run(args: argparse.Namespace) -> int:
    settings = load_settings_or_exit()
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        if args.command == "stats":
            stats = await queue.stats()
            print(orjson.dumps(dataclasses.asdict(stats)).decode())
            return 0
        if args.command == "webhooks":
            for letter in await queue.webhook_dead_letters(args.count):
                print(orjson.dumps({"entry_id": letter.entry_id, **letter.fields}).decode())
            return 0
        if args.action == "list":
            for letter in await queue.dead_letters(args.count):
                record = await queue.get(letter.task_id, letter.fields.get("scope", ""))
                error = record.error if record else "(task expired)"
                print(f"{letter.entry_id}  task={letter.task_id}  {error}")
            return 0
        entry_ids = list(args.entry_ids)
        if args.all:
            entry_ids = [letter.entry_id for letter in await queue.dead_letters(_ALL_AT_ONCE)]
        if not entry_ids:
            print("nothing to replay: name entry ids or pass --all", file=sys.stderr)
            return 1
        replayed = await queue.replay_dead_letters(entry_ids)
        print(f"replayed {replayed} of {len(entry_ids)} dead-lettered tasks")
        return 0
    except QueueUnavailable as error:
        print(f"redis cannot serve this now ({error}); try again shortly", file=sys.stderr)
        return 1
    finally:
        await queue.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastapi_redis_mini.admin")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("stats", help="queue depth as Redis reports it")
    dead = commands.add_parser("dead-letter", help="list or replay dead-lettered tasks")
    actions = dead.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="show dead-lettered tasks")
    listing.add_argument("--count", type=int, default=100)
    replay = actions.add_parser("replay", help="put dead-lettered tasks back on the stream")
    replay.add_argument("entry_ids", nargs="*", metavar="ENTRY_ID")
    replay.add_argument("--all", action="store_true", help="replay every dead-lettered task")
    webhooks = commands.add_parser("webhooks", help="webhook deliveries that failed for good")
    webhook_actions = webhooks.add_subparsers(dest="action", required=True)
    failed = webhook_actions.add_parser("dead-letter", help="show them as JSON lines")
    failed.add_argument("--count", type=int, default=100)
    return asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

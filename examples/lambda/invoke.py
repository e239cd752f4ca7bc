"""Fans out the N invocations of one fmi job: one Lambda invocation per rank, all at once.

    # against AWS (boto3, credentials from the environment; not run by the tests):
    python invoke.py --function fmi-allreduce --ranks 8 --rendezvous 203.0.113.10:7447

    # locally, each "invocation" a process running handler.py (or any handler command):
    python invoke.py --local --ranks 4 --rendezvous 127.0.0.1:7447

Every rank blocks until all ranks have joined, so the invocations must run concurrently: the
function's reserved concurrency must allow N, and they are started from N threads (the
synchronous ``RequestResponse`` type returns each rank's result; ``--async`` uses the ``Event``
type and returns at once). The rendezvous server must be reachable from the functions, e.g.
``fmi rendezvous --listen 0.0.0.0:7447`` on a VM with a public address. Prints one JSON
response per rank, in rank order, and exits non-zero if any rank failed.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def events(ranks: int, rendezvous: str, config: str | None, channel: str | None,
           job: str | None = None) -> list[dict[str, Any]]:
    """One event per rank: a fresh job id and secret token shared by the job."""
    job = job or f"lambda-{uuid.uuid4().hex[:16]}"
    token = secrets.token_hex(16)
    return [
        {"rank": r, "size": ranks, "job": job, "rendezvous": rendezvous, "token": token,
         "config": config, "channel": channel}
        for r in range(ranks)
    ]


def invoke_lambda(function: str, event: dict[str, Any], asynchronous: bool) -> dict[str, Any]:
    import boto3  # only needed against AWS

    client = boto3.client("lambda")
    reply = client.invoke(
        FunctionName=function,
        InvocationType="Event" if asynchronous else "RequestResponse",
        Payload=json.dumps(event).encode(),
    )
    if asynchronous:
        return {"rank": event["rank"], "status": reply["StatusCode"]}
    return json.loads(reply["Payload"].read())


def invoke_local(command: list[str], event: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([*command, json.dumps(event)], capture_output=True, text=True,
                          timeout=300)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"errorType": "LocalInvocationFailed",
                "errorMessage": f"exit {proc.returncode}: {proc.stderr.strip()}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--rendezvous", required=True, help="host:port of fmi rendezvous")
    parser.add_argument("--config", help="configuration file path inside the function")
    parser.add_argument("--channel", help="force a channel (tcp, redis, s3, ...)")
    parser.add_argument("--job", help="job id (default: a fresh random one)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--function", help="name or ARN of the deployed Lambda function")
    target.add_argument("--local", action="store_true",
                        help="run each invocation as a local process instead")
    parser.add_argument("--handler", nargs="+",
                        default=[sys.executable, str(HERE / "python" / "handler.py")],
                        help="with --local: the command of one invocation (event appended)")
    parser.add_argument("--async", dest="asynchronous", action="store_true",
                        help="with --function: fire-and-forget (Event invocations)")
    args = parser.parse_args(argv)

    job_events = events(args.ranks, args.rendezvous, args.config, args.channel, args.job)
    with ThreadPoolExecutor(max_workers=args.ranks) as pool:
        if args.local:
            results = list(pool.map(lambda e: invoke_local(args.handler, e), job_events))
        else:
            results = list(pool.map(
                lambda e: invoke_lambda(args.function, e, args.asynchronous), job_events))
    for result in results:
        print(json.dumps(result))
    return 1 if any("errorMessage" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

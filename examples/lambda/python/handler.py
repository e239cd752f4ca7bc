"""An fmi job step as an AWS Lambda handler (Python).

Every invocation is one rank. Its event says which job to join and how:

    {"rank": 0, "size": 4, "job": "job-1234", "rendezvous": "203.0.113.10:7447",
     "token": "secret", "config": null, "channel": null, "values": [1.0, 2.0]}

The handler joins the job, sums every rank's ``values`` (default ``[rank + 1]``) with an
allreduce, and returns ``{"rank", "size", "job", "sum"}``. Package it with the ``fmi`` wheel
(``pip install ./bindings-python``); numpy is not needed.

Locally, ``python handler.py '<event json>'`` runs one invocation and prints the response;
``invoke.py --local`` fans out N of them like the Lambda driver does.
"""

from __future__ import annotations

import json
import sys
from array import array
from typing import Any

import fmi


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda entry point: joins the job, allreduces, returns the sum."""
    comm = fmi.Communicator(
        event["rank"],
        event["size"],
        event["job"],
        config=event.get("config"),
        rendezvous=event.get("rendezvous"),
        token=event.get("token"),
        channel=event.get("channel"),
    )
    values = array("d", event.get("values") or [event["rank"] + 1])
    total = array("d", bytes(len(values) * values.itemsize))
    comm.Allreduce(values, total, op=fmi.SUM)
    return {"rank": comm.rank, "size": comm.size, "job": comm.job, "sum": list(total)}


def main() -> int:
    text = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
    try:
        response = handler(json.loads(text))
    except fmi.Error as e:
        print(json.dumps({"errorType": type(e).__name__, "errorMessage": str(e)}))
        return 1
    print(json.dumps(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())

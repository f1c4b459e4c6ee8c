"""`python -m cinesr.worker`: the worker's own entry point (the embedded worker of `cinesr serve` starts it
this way, so that the worker package never reaches up into the service). Same options as `cinesr worker`."""

from __future__ import annotations

import argparse
import sys

from cinesr.model.errors import CineSRError
from cinesr.worker.logs import configure_logging
from cinesr.worker.queue.consumer import POOLS, run_worker
from cinesr.worker.settings import describe_error
from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cinesr.worker", description=run_worker.__doc__)
    parser.add_argument("--log-level", default="WARNING", help="level of the JSON logs on stderr")
    parser.add_argument("--pool", default="prefork", choices=POOLS)
    parser.add_argument("--hostname", default=None, help="Celery node name (default cinesr-<pid>@<host>)")
    parser.add_argument("--gpu", default=None, help="GPU index or UUID (sets CUDA_VISIBLE_DEVICES)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        run_worker(args.pool, args.hostname, args.gpu)
    except CineSRError as exc:
        print(f"cinesr worker: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"cinesr worker: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

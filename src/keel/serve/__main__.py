"""``python -m keel.serve --spec keel.toml [--model PATH] [--host H] [--port N]``: the service without the CLI.

Used by the uvicorn-process tests and the serving benchmark; ``keel serve`` calls :func:`keel.serve.run` too.
"""

from __future__ import annotations

import argparse
import sys

from keel.errors import KeelError
from keel.serve.app import run
from keel.spec import load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keel.serve", description=__doc__)
    parser.add_argument("--spec", default="keel.toml", help="Path to keel.toml (or its folder).")
    parser.add_argument("--model", default=None, help="Serve this artifact folder instead of the registry alias.")
    parser.add_argument("--host", default=None, help="Bind address (default: serving.host).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: serving.port).")
    parser.add_argument("--workers", type=int, default=None, help="Worker processes (default: serving.workers).")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error.")
    args = parser.parse_args(argv)
    try:
        run(load_spec(args.spec), args.host, args.port, args.workers, model_path=args.model, log_level=args.log_level)
    except KeelError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

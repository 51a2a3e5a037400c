"""`python -m llava.model.compression --list`: every method, its signals and its arguments.

`--run-name METHOD [key=value ...]` prints the part of an answers file's name that identifies the
method and its arguments (empty for GlobalCom2 with default arguments, so older names stay); with
`--record-args`, a second line: the arguments a results record names the run by (`row_args`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from llava.model.compression import describe, method_names, parse_method_args
from llava.model.compression.registry import non_default_args, row_args


def run_name(method: str, pairs: list[str]) -> str:
    """`<method>[-<8 hex digits of the non-default arguments>]`, or "" for default GlobalCom2."""
    changed = non_default_args(parse_method_args(method, pairs))
    if method == "globalcom2" and not changed:
        return ""
    if not changed:
        return method
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    return f"{method}-{digest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The registered compression methods.")
    parser.add_argument("--list", action="store_true", help="print every method with its arguments and defaults")
    parser.add_argument("--run-name", nargs="+", metavar=("METHOD", "KEY=VALUE"),
                        help="print the answers-file name part of a method and its arguments")
    parser.add_argument("--record-args", action="store_true",
                        help="with --run-name: also print, on a second line, the arguments that name a results row")
    args = parser.parse_args(argv)
    try:
        if args.run_name:
            method, pairs = args.run_name[0], args.run_name[1:]
            print(run_name(method, pairs))
            if args.record_args:
                print(" ".join(f"{key}={value}" for key, value in row_args(parse_method_args(method, pairs)).items()))
        else:
            print("\n\n".join(describe(name) for name in method_names()))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

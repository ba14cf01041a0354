"""Command line: ``python -m procshare`` (also installed as the ``procshare`` script).

Owns: argument parsing and dispatch to subcommands. Each subcommand is
an ``add_*`` function that declares its arguments and a handler returning an exit status;
the work itself lives in other modules, imported only when the subcommand runs, so that
``--help`` works even if the rest of the package cannot be imported.

Subcommands: ``demo`` (see procshare.cli.demo).

Rules it keeps:
- A subcommand's module is imported only when it runs.
- The exit status is the handler's: 0 for success, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys


def _demo(args: argparse.Namespace) -> int:
    from procshare.cli import demo

    if args.list:
        demo.list_scenes()
        return 0
    try:
        scenes = [demo.get_scene(name) for name in args.scenes]
    except KeyError as exc:
        print(f"procshare demo: {exc.args[0]}", file=sys.stderr)
        return 2
    return demo.run(
        [s.name for s in scenes],
        start_method=args.start_method,
        compare_stdlib=not args.no_stdlib,
    )


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the demo scenes: what procshare does, shown with real processes",
        description="Run the demo scenes (all of them, or the ones named).",
    )
    p.add_argument("scenes", nargs="*", metavar="NAME", help="scenes to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the scenes and exit")
    p.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=None,
        help="multiprocessing start method (default: the platform's default)",
    )
    p.add_argument(
        "--no-stdlib",
        action="store_true",
        help="skip the side-by-side runs on the stdlib's multiprocessing.managers",
    )
    p.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procshare",
        description="procshare: a drop-in multiprocessing.managers that stays boring.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

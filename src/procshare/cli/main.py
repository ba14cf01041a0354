"""Command line: ``python -m procshare`` (also installed as the ``procshare`` script).

Owns: argument parsing and dispatch to subcommands. Each subcommand is
an ``add_*`` function that declares its arguments and a handler returning an exit status;
the work itself lives in other modules, imported only when the subcommand runs, so that
``--help`` works even if the rest of the package cannot be imported.

Subcommands: ``demo`` (see procshare.cli.demo) and ``serve`` (a standalone manager
that other programs `connect()` to, see `_serve`).

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


AUTHKEY_ENV = "PROCSHARE_AUTHKEY"


def parse_address(text: str) -> str | tuple[str, int]:
    """`host:port` (TCP), or anything else: a Unix socket path."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and "/" not in text:
        return (host or "127.0.0.1", int(port))
    return text


def _serve(args: argparse.Namespace) -> int:
    import os

    from procshare import managers

    key = os.environ.get(AUTHKEY_ENV)
    if not key:
        print(f"procshare serve: set the authkey in the environment variable {AUTHKEY_ENV} "
              "(clients pass the same bytes as authkey=); it is never printed",
              file=sys.stderr)
        return 2
    address = parse_address(args.address)
    manager = managers.SyncManager(address=address, authkey=key.encode(),
                                   serializer=args.serializer, state_dir=args.state_dir,
                                   fsync=args.fsync)
    # a socket file left by a killed run of this command is replaced, not an error
    manager._server_options["replace_stale"] = True
    # connected clients come back to a new run of this command: its durable objects,
    # unnamed ones included, are recovered for them, as after a crash
    manager._server_options["resume"] = True
    try:
        server = manager.get_server()
    except OSError as e:
        print(f"procshare serve: cannot listen at {args.address!r}: {e}", file=sys.stderr)
        return 1
    if args.state_dir is not None:
        # its durable objects outlive it: clients wait for it to come back (under
        # systemd or the like) and re-send their calls, as with a started manager
        server.supervised = True
    where = args.state_dir or "none: durable objects last until this process exits"
    print(f"procshare serve: serving at {server.address!r} (pid {os.getpid()}, serializer "
          f"{args.serializer!r}, state dir {where}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except SystemExit:
        pass
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run a standalone manager (a SyncManager) that other programs connect() to",
        description=(
            "Run a SyncManager's server in this process until Ctrl-C. Nothing restarts it "
            "(run it under systemd or another supervisor for that); with --state-dir, its "
            "durable objects survive a restart of this command. The authkey comes from the "
            f"environment variable {AUTHKEY_ENV}."),
    )
    p.add_argument("address", help="HOST:PORT for TCP, or a Unix socket path")
    p.add_argument("--state-dir", default=None,
                   help="directory for the journal of durable objects (mode 0700)")
    p.add_argument("--fsync", choices=("normal", "full"), default="normal",
                   help="'full': commits survive power loss (slower); default 'normal'")
    p.add_argument("--serializer", default="pickle",
                   help="the manager's serializer (default: pickle)")
    p.set_defaults(handler=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procshare",
        description="procshare: a drop-in multiprocessing.managers that stays boring.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo(sub)
    add_serve(sub)
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

"""The one way every krasis command ends: a one-line error and exit 2, never a traceback."""

from __future__ import annotations

import sys

from .format import KrsError


def run_app(app, prog: str, interrupted: str | None = None) -> None:
    """Run a typer app; KrsError -> 'PROG: error: ...' on stderr, exit 2; Ctrl-C -> 130; closed pipe -> 0."""
    try:
        app()
    except KrsError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted:
            print(f"{prog}: {interrupted}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)

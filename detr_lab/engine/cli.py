"""What the command-line tools share: `--set` overrides, `--debug`, the model backend arguments
(`--checkpoint` or `--backend onnxruntime --model`), one-line errors and exit codes.

Exit codes: 0 success, 1 a runtime failure (missing or unreadable file, mismatched checkpoint),
2 an invalid configuration or command line (ConfigError, as argparse uses 2 for usage errors),
130 interrupted (SIGINT or SIGTERM; training saves its state first, see
`detr_lab.engine.callbacks.PreserveTrainingState`). Without `--debug` a failure prints one line
`<tool>: error: <message>` on stderr; with it the exception propagates with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from detr_lab.config import ConfigError

EXIT_FAILURE = 1
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130


class ToolError(RuntimeError):
    """A failure a tool reports in one line: the message names the file or value at fault."""


class Interrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM at a safe point (tools exit with `EXIT_INTERRUPTED`).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it; not a
    KeyboardInterrupt, because Lightning turns that into `sys.exit(1)`. The message says what was
    saved and how to continue.
    """


def add_common_arguments(parser: argparse.ArgumentParser, *, overrides: bool = True) -> None:
    if overrides:
        parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set optim.lr=2e-4 (repeatable)",
        )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def add_backend_arguments(parser: argparse.ArgumentParser, *, checkpoint_help: str) -> None:
    """`--checkpoint`, `--backend pytorch|onnxruntime` and `--model` (an exported .onnx file); check the
    command line with `parse_backend_arguments`."""
    parser.add_argument("--checkpoint", help=checkpoint_help)
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                        help="pytorch (default) or onnxruntime (an exported --model)")
    parser.add_argument("--model", help="exported .onnx file (onnxruntime backend)")


def parse_backend_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, exiting through `parser.error` (status 2) unless the pytorch backend
    has a --checkpoint and no --model, and onnxruntime a --model and no --checkpoint."""
    args = parser.parse_args(argv)
    if args.backend == "pytorch" and (args.checkpoint is None or args.model is not None):
        parser.error("the pytorch backend needs --checkpoint (and no --model)")
    if args.backend == "onnxruntime" and (args.model is None or args.checkpoint is not None):
        parser.error("--backend onnxruntime needs --model model.onnx (and no --checkpoint)")
    return args


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not text:
        return type(err).__name__
    if len(lines) > 1:
        text += " [...]"
    if isinstance(err, (ConfigError, ToolError, Interrupted, FileNotFoundError, ValueError)):
        return text
    return f"{type(err).__name__}: {text}"


def run_tool(prog: str, body: Callable[[], object], *, debug: bool) -> int:
    """Run `body()`, turning an exception into a one-line message and an exit code (see module doc)."""
    try:
        body()
    except Interrupted as err:
        print(f"{prog}: interrupted: {one_line(err)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        code = EXIT_CONFIG_ERROR if isinstance(err, ConfigError) else EXIT_FAILURE
        hint = "" if isinstance(err, (ConfigError, ToolError)) else " (run with --debug for the traceback)"
        print(f"{prog}: error: {one_line(err)}{hint}", file=sys.stderr)
        return code
    return 0


def split_model_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split `key=value` overrides into those under `model.` and the rest (order kept)."""
    model = [item for item in overrides if item.strip().startswith("model.")]
    other = [item for item in overrides if not item.strip().startswith("model.")]
    return model, other

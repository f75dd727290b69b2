"""What the command-line tools share: `--set` overrides, `--debug`, `--print-config`, the model backend
arguments (`--checkpoint` or `--backend onnxruntime --model`), one-line errors and exit codes.

Only the tools (`tools/*.py`) import this module; the library raises its own errors
(`detr_lab.errors`, `ConfigError`, `CheckpointError`, `DatasetError`, ...) and the tools translate
them here. `ToolError` is for the tools' own checks of their arguments; `check_not_an_input` refuses an
output path that is one of the tool's inputs (no tool writes over its inputs).

Exit codes: 0 success, 1 a runtime failure (missing or unreadable file, mismatched checkpoint),
2 an invalid configuration or command line (ConfigError, as argparse uses 2 for usage errors),
130 interrupted (SIGINT or SIGTERM; training saves its state first, see
`detr_lab.engine.callbacks.PreserveTrainingState`). Without `--debug` a failure prints one line
`<tool>: error: <message>` on stderr; with it the exception propagates with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Mapping

from detr_lab.config import ConfigError, config_yaml, load_config
from detr_lab.engine.console import warning_line
from detr_lab.errors import DetrLabError, InputError, Interrupted

__all__ = [
    "EXIT_CONFIG_ERROR",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "Interrupted",
    "ToolError",
    "add_common_arguments",
    "add_print_config_argument",
    "check_not_an_input",
    "print_config",
    "one_line",
    "run_tool",
]

EXIT_FAILURE = 1
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130


class ToolError(RuntimeError):
    """A tool's own check of its arguments failed (raised in `tools/` only); the message names the
    option or value at fault."""

# Printed as their message alone, without the --debug hint: the message says what to fix.
_SELF_EXPLAINING = (ConfigError, DetrLabError, ToolError)


def add_common_arguments(parser: argparse.ArgumentParser, *, overrides: bool = True) -> None:
    if overrides:
        parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set optim.lr=2e-4 (repeatable)",
        )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def add_print_config_argument(parser: argparse.ArgumentParser) -> None:
    """`--print-config`: print the resolved config and exit (see `print_config`)."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (--config, its _base_ files and --set "
                             "overrides) as YAML and exit")


def print_config(config: str | None, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Print `load_config(config, overrides)` as YAML on stdout (what a run would write as config.yaml).

    Raises:
        ToolError: no --config was given. ConfigError: the config or an override is invalid.
    """
    if config is None:
        raise ToolError("--print-config needs --config")
    print(config_yaml(load_config(config, overrides)), end="")


def add_backend_arguments(
    parser: argparse.ArgumentParser, *, checkpoint_help: str, pretrained: bool = False
) -> None:
    """`--checkpoint`, `--backend pytorch|onnxruntime|openvino` and `--model` (an exported .onnx file, or
    an OpenVINO .xml; with `pretrained`, also a zoo name, a Hub-style model folder or a Hub repository
    id for the pytorch backend); check the command line with `parse_backend_arguments`."""
    parser.add_argument("--checkpoint", help=checkpoint_help)
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime", "openvino"), default="pytorch",
                        help="pytorch (default), onnxruntime or openvino (an exported --model)")
    model_help = "exported .onnx file (onnxruntime) or .xml IR (openvino)"
    if pretrained:
        model_help = ("pytorch backend: a zoo name (e.g. dino-4scale-r50, downloaded once into "
                      "$DETR_LAB_CACHE_DIR), a model folder or a Hub repo id; onnxruntime: an exported "
                      ".onnx file; openvino: an .xml IR")
    parser.add_argument("--model", help=model_help)


def parse_backend_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None, *, pretrained: bool = False
) -> argparse.Namespace:
    """`parser.parse_args(argv)`, exiting through `parser.error` (status 2) unless the pytorch backend
    has a --checkpoint and no --model (with `pretrained`: exactly one of them), and onnxruntime /
    openvino a --model and no --checkpoint."""
    args = parser.parse_args(argv)
    if getattr(args, "print_config", False):
        return args  # no model needed to print the config
    if args.backend == "pytorch" and pretrained and (args.checkpoint is None) == (args.model is None):
        parser.error("the pytorch backend needs --checkpoint FILE or --model NAME|FOLDER (one of them)")
    if args.backend == "pytorch" and not pretrained and (args.checkpoint is None or args.model is not None):
        parser.error("the pytorch backend needs --checkpoint (and no --model)")
    if args.backend == "onnxruntime" and (args.model is None or args.checkpoint is not None):
        parser.error("--backend onnxruntime needs --model model.onnx (and no --checkpoint)")
    if args.backend == "openvino" and (args.model is None or args.checkpoint is not None):
        parser.error("--backend openvino needs --model model.xml (and no --checkpoint)")
    return args


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not text:
        return type(err).__name__
    if len(lines) > 1:
        text += " [...]"
    if isinstance(err, (*_SELF_EXPLAINING, Interrupted, FileNotFoundError, ValueError)):
        return text
    return f"{type(err).__name__}: {text}"


def run_tool(prog: str, body: Callable[[], object], *, debug: bool) -> int:
    """Run `body()`, turning an exception into a one-line message and an exit code (see module doc).
    Warnings print as one line `<Category>: <message>`, without the file path and source line (with
    `--debug`, in Python's own form)."""
    if not debug:
        warnings.formatwarning = warning_line
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
        hint = "" if isinstance(err, _SELF_EXPLAINING) else " (run with --debug for the traceback)"
        print(f"{prog}: error: {one_line(err)}{hint}", file=sys.stderr)
        return code
    return 0


def check_not_an_input(output: str | os.PathLike | None, inputs: Mapping[str, str | os.PathLike | None],
                       *, option: str) -> None:
    """Refuse to write `output` where it is one of the `inputs` (the same file, links resolved).

    Args:
        output: the file a tool is about to write (None: nothing to check).
        inputs: option name -> input file (None entries are skipped), e.g. {"--checkpoint": path}.
        option: the output's option name, for the message.
    Raises:
        InputError: "<option> <path> is the <input option> input; writing it would destroy that input:
            choose another <option>".
    """
    if output is None:
        return
    target = os.path.realpath(output)
    for name, given in inputs.items():
        if given is not None and os.path.realpath(given) == target:
            raise InputError(f"{option} {output} is the {name} input ({given}); writing it would destroy "
                             f"that input: choose another {option}")

"""``edgequant`` entry point: a click group whose default command is ``quantize``."""

from __future__ import annotations

import difflib
import errno
import logging
import os
import signal
import sys

import click

from edgequant import __version__
from edgequant.errors import EdgequantError


class DefaultGroup(click.Group):
    """Runs ``quantize`` when the first argument is not a command (``edgequant -c cfg.json``)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            close = difflib.get_close_matches(args[0], list(self.commands), n=1, cutoff=0.75)
            if close and not os.path.exists(args[0]):  # ``edgequant quantise m.onnx``: a typo, not a model
                raise click.UsageError(f"no command {args[0]!r}; did you mean {close[0]!r}?", ctx)
            args = ["quantize", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgequant")
def cli() -> None:
    """Post-training quantization of ONNX models for edge NPUs.

    \b
    edgequant demo                                   quantize the bundled MNIST CNN
    edgequant quantize model.onnx -o model.q.onnx --calib samples/
    edgequant export model.pt -o model.onnx --input-shape input=1x3x224x224
    edgequant -c config.json                         XQuant-style config file
    edgequant analyze model.onnx model.q.onnx --calib samples/ -o report/
    edgequant run model.q.onnx --inputs x.npz --dump-all -o q.npz
    edgequant compare f.npz q.npz --tolerance 0.99,0.90
    edgequant targets [show NAME]                    target profiles (NPU rules)
    edgequant check model.q.onnx --target espdl      does a QDQ model obey them
    """


def _register() -> None:
    from edgequant.cli.analyze import analyze
    from edgequant.cli.compare import compare
    from edgequant.cli.demo import demo
    from edgequant.cli.export import export
    from edgequant.cli.quantize import quantize
    from edgequant.cli.run import run
    from edgequant.cli.targets import check, targets

    for command in (quantize, analyze, run, compare, targets, check, demo, export):
        cli.add_command(command)


_register()


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every ``finally`` and cleanup runs (not a
    KeyboardInterrupt, which click turns into "aborted")."""


def _terminated(signum, frame) -> None:
    raise Terminated()


#: Filesystem faults, as a user reads them: what happened and what to do.
FAULTS = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere with -o",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere with -o",
    errno.EFBIG: "file too large for this file system; write elsewhere with -o",
    errno.ENAMETOOLONG: "file name too long for this file system; choose a shorter name",
    errno.EROFS: "read-only file system; write elsewhere with -o",
    errno.EISDIR: "a folder stands where a file was to be written; give a file name",
    errno.EACCES: "permission denied; choose a path you can write",
    errno.EPERM: "operation not permitted; choose a path you can write",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    try:
        signal.signal(signal.SIGTERM, _terminated)  # unwinds like Ctrl-C: temporary files removed
    except ValueError:  # not the main thread: leave signals to the caller
        pass
    try:
        cli.main(args=argv, prog_name="edgequant", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other error
        where = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "edgequant --help"
        click.echo(f"error: {exc.format_message()} (see {where})", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgequantError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Terminated:
        click.echo("terminated", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # the machine, not edgequant: name it in plain words, with the path
        if debug or exc.errno not in FAULTS:
            if debug:
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)
        where = f" ({exc.filename})" if exc.filename else ""
        click.echo(f"error: {FAULTS[exc.errno]}{where}", err=True)
        sys.exit(2)
    except Exception as exc:  # an internal failure: say so, short, unless --debug
        if debug:
            raise
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)

"""The `ctxdraft` command: a thin click layer over the library. Each command lives in its own module and is
registered here, in one place."""
from __future__ import annotations

import logging
import sys

import click

from ctxdraft.selfdraft.base.errors import CtxdraftError

from .arms import add_arm_cmd
from .bench import bench_cmd
from .calibrate import calibrate_cmd
from .common import FAULTS, fault_message
from .exits import add_exits_cmd
from .generate import generate_cmd, info_cmd
from .make_data import make_data_cmd
from .online import update_policy_cmd
from .policy import collect_cmd, export_policy_cmd, train_policy_cmd

try:
    from .serve import serve_cmd
except ImportError as missing:  # the optional serve extra (fastapi, uvicorn, prometheus_client) is not installed
    _missing = str(missing)

    @click.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def serve_cmd():
        """Serve over an OpenAI-compatible HTTP API (needs: pip install 'ctxdraft[serve]')."""
        raise CtxdraftError(f"ctxdraft serve needs the serve extra: pip install 'ctxdraft[serve]' ({_missing})")


class _Group(click.Group):
    """Turns CtxdraftError (bad input) and OS faults (``common.FAULTS``) into one line on stderr and exit code 2,
    without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CtxdraftError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except FAULTS as e:
            click.echo(f"Error: {fault_message(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def _show_library_notices() -> None:
    """The library reports long waits and one-off work (a first download, a calibration) with logging: show it
    on stderr, one line each; progress-level detail (INFO) only on a terminal."""
    logger = logging.getLogger("ctxdraft")
    if not any(getattr(h, "_ctxdraft_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._ctxdraft_cli = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if sys.stderr.isatty() else logging.WARNING)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ctxdraft")
def main():
    """ctxdraft: faster generation with the same output, by picking the right draft per query.

    \b
    Typical flow on the embedded default model (SmolLM2-135M-Instruct):
      ctxdraft generate "Summarize: ..."            # uses the shipped default bundle
      ctxdraft add-exits --layers 10,16,22 --data prompts.jsonl --out my_bundle
      ctxdraft train-policy my_bundle --data prompts.jsonl
      ctxdraft generate --bundle my_bundle "..."
      ctxdraft bench --bundle my_bundle --data prompts.jsonl
      ctxdraft calibrate                              # the policy, recomputed for this machine's costs
      ctxdraft generate --bundle my_bundle --log traffic.jsonl --explore 0.1 "..."
      ctxdraft update-policy my_bundle --logs traffic.jsonl   # learn from served traffic
      ctxdraft serve --bundle my_bundle --log traffic.jsonl   # OpenAI-compatible HTTP server
    """
    _show_library_notices()


for command in (generate_cmd, info_cmd, add_arm_cmd, add_exits_cmd, collect_cmd, train_policy_cmd, export_policy_cmd,
                calibrate_cmd, bench_cmd, update_policy_cmd, serve_cmd, make_data_cmd):
    main.add_command(command)

if __name__ == "__main__":
    sys.exit(main())

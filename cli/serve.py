"""`ctxdraft serve`: the OpenAI-compatible HTTP server."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.entrypoints.openai_server import ServeConfig, serve

from .common import dtype_option, no_calibrate_option


@click.command("serve")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), help="Bundle directory (default: the shipped bundle).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port (0: any free one, printed when listening).")
@click.option("--max-batch", default=8, show_default=True, type=int,
              help="Most requests decoded together: rows of one continuous batch (1: one at a time).")
@click.option("--max-queue", default=64, show_default=True, type=int, help="Most requests waiting; more get 429.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False),
              help="Append every routed request to this traffic log (JSONL) for `ctxdraft update-policy`.")
@click.option("--explore", default=0.0, show_default=True, type=float,
              help="Epsilon-greedy routing: a uniformly random arm with this probability (goes with --log).")
@click.option("--api-key", envvar="CTXDRAFT_API_KEY", help="Require 'Authorization: Bearer KEY' (also CTXDRAFT_API_KEY).")
@click.option("--grace", default=30.0, show_default=True, type=float,
              help="Seconds SIGTERM waits for requests in flight before cancelling them.")
@dtype_option
@no_calibrate_option
def serve_cmd(bundle_dir, host, port, max_batch, max_queue, log_path, explore, api_key, grace, dtype, no_calibrate):
    """Serve the bundle over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics).

    SIGHUP (or a changed policy file, e.g. after `update-policy --in-place`) reloads the policy; SIGTERM stops
    admitting, finishes the requests in flight and exits 0.

    \b
    Examples:
      ctxdraft serve --port 8000
      ctxdraft serve --bundle my_bundle --log traffic.jsonl --explore 0.1
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "Hello", "max_tokens": 32, "temperature": 0}'
    """
    def ready(h, p):
        click.echo(f"ctxdraft serving on http://{h}:{p}/v1 (Ctrl+C or SIGTERM to stop)", err=True)

    serve(ServeConfig(bundle_dir=bundle_dir, host=host, port=port, max_batch=max_batch, max_queue=max_queue,
                      dtype=dtype, calibrate=False if no_calibrate else None, log=log_path, explore=explore,
                      api_key=api_key, grace_s=grace), ready=ready)

"""`ctxdraft make-data`: a training corpus the models write themselves."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.commands.make_data import DOMAINS, MakeDataConfig, make_data_from_specs

from .common import dtype_option, echo_json, progress_bar


@click.command("make-data")
@click.argument("target", required=False)
@click.option("--out", "out_path", required=True, type=click.Path(), help="JSONL file to write (or to continue).")
@click.option("--rows", type=int, default=1000, show_default=True, help="Rows the file should hold when done.")
@click.option("--writer", help="The model that writes the queries (same chat format; default: the target).")
@click.option("--domains", default=",".join(DOMAINS), show_default=True, help="Comma-separated domain mix, taken "
              "round-robin.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Rows per forward.")
@click.option("--max-query-tokens", type=int, default=96, show_default=True)
@click.option("--max-answer-tokens", type=int, default=128, show_default=True)
@click.option("--query-temperature", type=float, default=1.0, show_default=True)
@click.option("--answer-temperature", type=float, default=0.0, show_default=True, help="0: the target's greedy answers.")
@click.option("--dedup-threshold", type=float, default=0.7, show_default=True, help="Word 3-gram Jaccard at which a "
              "query is dropped as a near-duplicate of an earlier one.")
@click.option("--min-query-words", type=int, default=3, show_default=True, help="Shorter queries are dropped.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--time-limit", type=float, default=None, help="Seconds; no new batch starts after this (resume later).")
@click.option("--resume", is_flag=True, help="Continue the rows already in --out (same models and settings).")
@click.option("--threads", type=int, help="torch threads (default: torch's; 1 avoids spin-waiting on a busy shared "
              "machine).")
@dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def make_data_cmd(target, out_path, rows, writer, domains, batch_size, max_query_tokens, max_answer_tokens,
                  query_temperature, answer_temperature, dedup_threshold, min_query_words, seed, time_limit, resume,
                  threads, dtype, as_json):
    """Write a training corpus (JSONL `prompt`/`text` rows for add-exits) with the models themselves.

    Queries are written Magpie-style: the writer model gets only its chat template's pre-query prefix
    (a short system prompt per domain, sometimes a few seed words) and writes a user query. Answers are
    the TARGET's own continuations of each query. Near-duplicate and looping rows are dropped. A killed
    run continues with --resume, giving exactly the rows of an uninterrupted run.

    \b
    Examples (the embedded default target):
      ctxdraft make-data --out corpus.jsonl --rows 2000 --time-limit 600
      ctxdraft make-data --out corpus.jsonl --rows 2000 --resume --json
      ctxdraft add-exits --head feature --layers 2,15,28 --data corpus.jsonl --out my_bundle
    """
    config = MakeDataConfig(rows=rows, batch_size=batch_size, domains=[d.strip() for d in domains.split(",") if d.strip()],
                            max_query_tokens=max_query_tokens, max_answer_tokens=max_answer_tokens,
                            query_temperature=query_temperature, answer_temperature=answer_temperature,
                            dedup_threshold=dedup_threshold, min_query_words=min_query_words, seed=seed,
                            time_limit=time_limit, resume=resume)
    with progress_bar(as_json) as bar:
        summary = make_data_from_specs(out_path, config, target=target, writer=writer, dtype=dtype, threads=threads,
                                       progress=bar)
    if as_json:
        echo_json(summary)
        return
    f = summary["filtered"]
    click.echo(f"{summary['out']}: {summary['rows']} rows ({summary['new_rows']} new), "
               f"{summary['query_tokens'] + summary['answer_tokens']} tokens at {summary['tokens_per_s']} tokens/s; "
               f"filtered {sum(f.values())} ({', '.join(f'{k} {v}' for k, v in f.items() if v) or 'none'})"
               + ("" if summary["complete"] else "; not complete: run again with --resume"))

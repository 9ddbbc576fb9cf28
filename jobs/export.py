#!/usr/bin/env python3
"""Write an existing output directory's results in another format.

    python -m jobs.export --format openai-batch OUTPUT_DIR_OR_URI

``openai-batch``: one Batch API result line per request (jobs/openai_batch.py), in ``results-<part>.jsonl``
beside each Parquet part, exactly as a job run with ``--output-format openai-batch`` writes them: parts that
lack their results file get one, and results files whose part is gone are deleted. Rows read from native input
export too: ``messages`` rows as ``chat.completion`` bodies, ``prompt`` rows as ``text_completion``.
"""

from __future__ import annotations

import argparse
import sys

from jobs.openai_batch import reconcile_results
from jobs.output import parts
from jobs.storage import StorageError, resolve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="a job's output directory, local or a URI")
    p.add_argument("--format", required=True, choices=["openai-batch"])
    args = p.parse_args(argv)
    try:
        out = resolve(args.output)
        if not parts(out):
            print(f"error: {out.uri} holds no output parts", file=sys.stderr)
            return 2
        written, deleted = reconcile_results(out)
    except (StorageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out.uri}: {written} results files written, {deleted} stale ones deleted", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

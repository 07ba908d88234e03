"""Process entry: run the loop, turn user errors into one clear line and exit code 2."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None, kind: str = "pretrain") -> int:
    """``kind``: "pretrain" (``train.loop``) or "finetune" (``train.finetune``)."""
    from dist_sparse.distributed.comm import remove_shm_buffers

    if kind == "finetune":
        from dist_sparse.train.finetune import run
    else:
        from dist_sparse.train.loop import run
    try:
        return run(argv)
    except ValueError as err:
        # Every rank hits the same check; one line per rank is readable and names the rank.
        import os
        if os.environ.get("DIST_SPARSE_TRACEBACK"):
            raise  # the whole traceback, for reports of errors raised inside libraries
        print(f"error (rank {os.environ.get('RANK', '0')}): {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        # DeepSpeed's CPU backend leaves its shared-memory buffers behind (see remove_shm_buffers)
        remove_shm_buffers()

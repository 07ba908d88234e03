"""Command-line arguments of a pre-training run (``launchers/pretrain.py``)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        description="BERT pre-training on DeepSpeed (start with the deepspeed launcher).")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON config; its 'training' section is dist_sparse's own")
    p.add_argument("--data", required=True, help="a dataset written by `dist-sparse prepare-data`")
    p.add_argument("--model", default="bert-tiny", help="model preset (bert-tiny, bert-mini, ..., bert-large)")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from these weights instead of a fresh --model preset: a dist_sparse pre-training "
                        "run or checkpoint, or a Hugging Face BertForPreTraining / BertForMaskedLM folder "
                        "(continued pre-training; a DynaBERT phase 1 or 2 in pre-training)")
    p.add_argument("--init-tag", default=None, metavar="TAG", help="checkpoint tag of a dist_sparse --init run")
    p.add_argument("--output", required=True, help="run directory (checkpoints, tensorboard, metrics)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides training.max_steps)")
    p.add_argument("--save-interval", type=int, default=None, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--eval-interval", type=int, default=None, help="evaluate every N steps (0: at the end)")
    p.add_argument("--seed", type=int, default=None, help="overrides training.seed")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/latest")
    p.add_argument("--resume-tag", default=None, metavar="TAG",
                   help="continue from RUN/checkpoints/TAG instead of the one 'latest' names (implies --resume)")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: continue the run to a larger --max-steps than it was planned for (the "
                        "learning-rate decay is re-stretched over the longer run from the resumed step; the "
                        "sparsity schedule keeps its length: see the README)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--overfit-batch", action="store_true",
                   help="train on the first batch over and over (a sanity check: the loss must fall)")
    p.add_argument("--sparsity-reset", action="store_true",
                   help="on --resume, ignore the checkpoint's masks (or their absence) and draw new ones "
                        "from the config's sparsity section (or none)")
    # The deepspeed launcher passes --local_rank; the environment carries it too.
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p

"""The ``dist-sparse`` command: subcommands around a pre-training run.

Training itself is started by the deepspeed launcher (``launchers/pretrain.py``); this command
holds the steps before and after it.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-sparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from dist_sparse.data.prepare import add_prepare_arguments, run_prepare
    p = sub.add_parser("prepare-data", help="corpus -> tokenizer -> BERT pre-training examples (Arrow)")
    add_prepare_arguments(p)
    p.set_defaults(func=run_prepare)

    from dist_sparse.data.task import add_prepare_task_arguments, run_prepare_task
    p = sub.add_parser("prepare-task", help="labelled text -> tokenized fine-tuning examples (Arrow)")
    add_prepare_task_arguments(p)
    p.set_defaults(func=run_prepare_task)

    p = sub.add_parser("inspect", help="per-layer masks and sparsity state of a run or checkpoint")
    p.add_argument("path", help="RUN, RUN/checkpoints, or RUN/checkpoints/<tag>")
    p.add_argument("--tag", help="checkpoint tag to inspect, e.g. global_step20 (default: the one 'latest' names)")
    p.set_defaults(func=lambda args: __import__("dist_sparse.inspect", fromlist=["run_inspect"]).run_inspect(args))

    p = sub.add_parser("export", help="a checkpoint as a Hugging Face folder that stock transformers loads")
    p.add_argument("checkpoint", help="RUN, RUN/checkpoints, or RUN/checkpoints/<tag>")
    p.add_argument("out_dir", help="folder to write: new, empty, or a previous export (with --overwrite)")
    p.add_argument("--format", choices=["dense", "compact"], default=None,
                   help="dense: stock BertForPreTraining (a fine-tuned run: BertForSequenceClassification), removed "
                        "heads/neurons as zeros (default); compact: "
                        "per-layer sizes physically smaller, loaded with trust_remote_code=True (the default, and "
                        "the only choice, for a DynaBERT sub-network of width < 1)")
    p.add_argument("--width", type=float, help="DynaBERT run: export only the sub-network of this width multiplier "
                                               "(one the run trained; default 1.0 when --depth is given)")
    p.add_argument("--depth", type=float, help="DynaBERT run: export only the sub-network of this depth multiplier "
                                               "(one the run trained; default 1.0 when --width is given)")
    p.add_argument("--tag", help="checkpoint tag to export, e.g. global_step20 (default: the one 'latest' names)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a previous export (any other folder is refused)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the run's DATA/tokenizer, as run.json records it); "
                                       "must be the run's own tokenizer")
    p.add_argument("--force-tokenizer", action="store_true",
                   help="accept a --tokenizer that is not the run's own, or that cannot be compared with it (run.json "
                        "or the data moved); its size and special-token ids must still be the model's")
    p.set_defaults(func=lambda args: __import__("dist_sparse.export.hf", fromlist=["run_export"]).run_export(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"dist-sparse {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""dist_sparse: sparse and structurally pruned BERT pre-training on DeepSpeed."""

__version__ = "0.1.0"

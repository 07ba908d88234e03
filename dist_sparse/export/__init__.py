"""Export to Hugging Face format (see DESIGN.md section 7 and ``dist-sparse export --help``).

checkpoint.py    locate a checkpoint, check its shard files, consolidate ZeRO partitions per TP rank
tp_merge.py      merge tensor-parallel shards with the layout DeepSpeed recorded (pure)
structured.py    fold slimming coefficients / pad a shrunk model back to stock shapes (pure)
remote_code.py   the standalone configuration/modeling files of the compact format
hf.py            the export itself: formats, sparsity.json, model card, verification, atomic write
"""

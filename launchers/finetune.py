#!/usr/bin/env python
"""Fine-tuning entry point for the deepspeed launcher.

    deepspeed --num_gpus 2 launchers/finetune.py --deepspeed_config ds_configs/cpu_zero2_finetune.json \
        --task TASK --init RUN_OR_HF_FOLDER --output RUN --epochs 3
"""

import sys

from dist_sparse.train.main import main

if __name__ == "__main__":
    sys.exit(main(kind="finetune"))

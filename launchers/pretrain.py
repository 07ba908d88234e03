#!/usr/bin/env python
"""BERT pre-training entry point for the deepspeed launcher.

    deepspeed --num_gpus 2 launchers/pretrain.py --deepspeed_config ds_configs/cpu_zero2.json \
        --data DATA --model bert-tiny --output RUN --max-steps 20
"""

import sys

from dist_sparse.train.main import main

if __name__ == "__main__":
    sys.exit(main())

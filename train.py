"""Train a minilm GPT; the commands of the design (configs/training/README.md) run as written.

    python train.py --config configs/training/tiny_model.json          # the laptop lesson: a few CPU minutes
    python train.py --config configs/training/small_model.json
    python train.py --config configs/training/base_model.json --learning_rate 0.00005
    python train.py --config configs/training/small_model.json --batch_size 32
    python train.py --config configs/training/base_model.json --resume_from_checkpoint outputs/checkpoint-10000
    torchrun --nproc_per_node=4 train.py --config configs/training/large_model.json
    python train.py sample --checkpoint outputs/tiny --prompt "ROMEO:"

All the work happens in minilm.cli (also installed as the `minilm` command).
"""

import sys

from minilm.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m tests.kill_after_step N train [overrides]``: ``megatrain train`` that dies by SIGKILL
once step N is done, checkpoint included (fault injection for the resume tests).

The kill comes from the trainer's ``should_stop`` callback, polled after every step: at the poll
of step N+1, i.e. after step N's checkpoint was saved and, for async saves, published by the
step's poll, and before step N+1 saves anything. What is on disk then is exactly what a crash
right after step N leaves (plus metrics of step N+1, which a resume truncates).
"""

import os
import signal
import sys

import megatrain.trainer
from megatrain.cli import main


def kill_after(step: int):
    def should_stop(current: int) -> bool:
        if current > step:
            os.kill(os.getpid(), signal.SIGKILL)
        return False
    return should_stop


if __name__ == "__main__":
    after, argv = int(sys.argv[1]), sys.argv[2:]
    train = megatrain.trainer.train
    # the CLI looks the trainer up when it runs: hand it the same train() with the callback
    megatrain.trainer.train = lambda cfg, should_stop=None: train(cfg, should_stop=kill_after(after))
    sys.exit(main(argv))

"""``python -m tests.kill_in_prepare STAGE [data prepare args]``: ``megatrain data prepare`` that
dies by SIGKILL as pipeline stage STAGE (e.g. ``5_minhash_cluster``) would start, every earlier
stage (and, before ``7_tokenize``, the tokenizer) finished: what a kill between two stages leaves
on disk (fault injection for the resume test).
"""

import os
import signal
import sys

import megatrain.data_pipelines.stages as stages
from megatrain.cli import main

if __name__ == "__main__":
    stage, argv = sys.argv[1], sys.argv[2:]
    run = stages.run_local_stage

    def run_or_die(name, pipeline, **kwargs):
        if name == stage:
            os.kill(os.getpid(), signal.SIGKILL)
        return run(name, pipeline, **kwargs)

    stages.run_local_stage = run_or_die  # prepare looks the runner up when it starts
    sys.exit(main(["data", "prepare", *argv]))

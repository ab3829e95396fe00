"""Run ``turbo-i2i`` in a subprocess for test_training_faults.py, optionally pausing inside a checkpoint write.

With ``TURBO_I2I_TEST_PAUSE_AT=N`` the write of checkpoint ``step_N`` stops after the model files are written (before
the discriminator, optimiser and trainer state), touches ``TURBO_I2I_TEST_PAUSED`` and sleeps, so the test can
SIGKILL the process in the middle of the write. The library is not changed: the writer is wrapped by composition
(a function that calls the real ``save_pretrained`` and then waits), installed only in this process.
"""

import os
import sys
import time
from pathlib import Path

import torch

from turbo_i2i import cli
from turbo_i2i.training import loop

torch.set_num_threads(1)  # one-thread kernels sum in a fixed order: runs in different processes agree exactly
pause_at = os.environ.get("TURBO_I2I_TEST_PAUSE_AT")
if pause_at:
    real_save_pretrained = loop.save_pretrained
    partial_name = f".step_{int(pause_at):07d}.partial"

    def save_then_pause(generator, folder, *args, **kwargs):
        written = real_save_pretrained(generator, folder, *args, **kwargs)
        if Path(folder).parent.name == partial_name:
            Path(os.environ["TURBO_I2I_TEST_PAUSED"]).write_text(str(os.getpid()))
            time.sleep(600)  # killed long before this ends
        return written

    loop.save_pretrained = save_then_pause
sys.exit(cli.main(sys.argv[1:]))

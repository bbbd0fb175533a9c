"""train.py with faults injected, for the tests of preemption, resume and divergence. TRAIN_FAULTS
in the environment, a JSON object, says which (steps count from 1, as in metrics.jsonl):

    kill_after     SIGKILL right after this step, as a preemption without warning would
    sigterm_after  SIGTERM right after this step, as a scheduler would
    nan_at         the steps whose loss is NaN
    rank           the process they hit (default -1: every process)

"Right after step N" is as step N + 1 begins: after step N's record, evaluation and checkpoint.
"""

import json
import math
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.argv[0] = str(ROOT / "train.py")

from axial_transformer.model.transformer import AxialTransformer  # noqa: E402
from axial_transformer.training import loop  # noqa: E402

faults = {"kill_after": None, "sigterm_after": None, "nan_at": [], "rank": -1,
          **json.loads(os.environ["TRAIN_FAULTS"])}
optimizer_step, loss = loop.optimizer_step, AxialTransformer.loss
poisoned = False


def faulty_optimizer_step(accelerator, objective, optimizer, batches, step, *args):
    global poisoned
    here = faults["rank"] in (-1, accelerator.process_index)
    if here and step == faults["kill_after"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if here and step == faults["sigterm_after"]:
        os.kill(os.getpid(), signal.SIGTERM)
    poisoned = here and step + 1 in faults["nan_at"]
    return optimizer_step(accelerator, objective, optimizer, batches, step, *args)


def faulty_loss(self, *args, **kwargs):
    value = loss(self, *args, **kwargs)
    return value * math.nan if poisoned else value


loop.optimizer_step, AxialTransformer.loss = faulty_optimizer_step, faulty_loss
import train  # noqa: E402

sys.exit(train.main(sys.argv[1:]))

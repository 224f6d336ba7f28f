""" run under torchrun by test_distributed.py: gpt.main, with SIGTERM reaching the second process alone, at
the moment a scheduler's signal can arrive at one process before the other: while it evaluates at step 20 """
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402

estimate_loss, calls = gpt.estimate_loss, []


def estimate_loss_then_signal(*args, **kwargs):
    losses = estimate_loss(*args, **kwargs)
    calls.append(1)
    if os.environ['RANK'] == '1' and len(calls) == 3:  # steps 0, 10, 20
        print(f"rank 1: SIGTERM to itself after the evaluation at step 20", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    return losses


gpt.estimate_loss = estimate_loss_then_signal
gpt.main(sys.argv[1:])

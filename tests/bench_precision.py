"""
bf16 autocast against fp32 on this CPU: the seconds of a whole training step of gpt.py's model (forward, backward,
the CPU run's Muon and AdamW) at each shape, the two alternating in one process, so that a machine that drifts in
speed affects both alike. gpt.py's precision='auto' takes bf16 on a CPU with bf16 in hardware from the width where
it wins (BF16_MIN_WIDTH). Run by hand, on a quiet machine, at the threads the run uses:

    python tests/bench_precision.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402

# (layers, width, heads, block, batch): the CPU default, wider ones, and the lecture's model at batch 8
SHAPES = [(2, 96, 3, 64, 32), (2, 128, 4, 64, 32), (3, 128, 4, 64, 32), (4, 192, 6, 128, 32), (4, 256, 4, 128, 32),
          (6, 384, 6, 256, 8)]


def step_seconds(model, optimizer, ctx, x, y, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        with ctx:
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - t0) / steps


def main():
    cpu = torch.device('cpu')
    print(f"{torch.get_num_threads()} threads; a step's ms in fp32 and bf16 autocast, the median of 5 rounds")
    for n_layer, n_embd, n_head, block, batch in SHAPES:
        torch.manual_seed(0)
        config = gpt.GPTConfig(vocab_size=65, block_size=block, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
                               dropout=0.0, activation='gelu')
        model = gpt.GPTLanguageModel(config)
        optimizer = gpt.configure_optimizer(model, gpt.get_config(['--optim=muon'])[0], cpu)
        x = torch.randint(65, (batch, block))
        ctxs = dict(fp32=gpt.nullcontext(), bf16=torch.autocast('cpu', dtype=torch.bfloat16))
        steps = max(2, int(2e6 // (batch * block * n_embd * n_layer)) + 1)
        times = {k: [] for k in ctxs}
        for r in range(6):  # the first round warms up
            for name, ctx in ctxs.items():
                s = step_seconds(model, optimizer, ctx, x, x, steps)
                if r:
                    times[name].append(s)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{n_layer}x{n_embd}, {n_head} heads, block {block}, batch {batch}: fp32 {med['fp32'] * 1000:.1f} ms, "
              f"bf16 {med['bf16'] * 1000:.1f} ms, bf16 speedup {med['fp32'] / med['bf16']:.2f}x", flush=True)


if __name__ == '__main__':
    main()

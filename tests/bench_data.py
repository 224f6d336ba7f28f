"""
Preparing a large text: gpt.py's numpy encoding to a memory-mapped file against the lecture's
torch.tensor(encode(text)), on generated UTF-8 text of a given size.

    python tests/bench_data.py 10 100       # sizes in MB

Each measurement runs in a fresh process; memory is the peak resident set size of that process
above what it held before the work began (Python, torch and numpy already imported). Run by hand.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch, gpt
def rss_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
before = rss_mb()
t0 = time.perf_counter()
if sys.argv[2] == 'lecture':
    with open(sys.argv[3], 'r', encoding='utf-8') as f:
        text = f.read()
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    encode = lambda s: [stoi[c] for c in s]
    data = torch.tensor(encode(text), dtype=torch.long)
    n = len(data)
else:
    chars, data = gpt.prepare_data(sys.argv[3], sys.argv[4])
    n = len(data)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(seconds=seconds, extra_mb=peak - before, tokens=n, vocab=len(chars))))
'''


def make_text(path, mb):
    """ mixed-script text: English words, accented Latin, Greek, Cyrillic and a few thousand CJK characters """
    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "café", "naïve", "λόγος", "мир", "слово", "über", "straße"]
    words += [''.join(chr(0x4E00 + rng.randrange(3000)) for _ in range(rng.randint(1, 3))) for _ in range(2000)]
    line = lambda: ' '.join(rng.choice(words) for _ in range(12)) + '\n'
    block = ''.join(line() for _ in range(20000)).encode('utf-8')
    with open(path, 'wb') as f:
        written = 0
        while written < mb * 1e6:
            f.write(block)
            written += len(block)


def measure(kind, path, cache):
    out = subprocess.run([sys.executable, '-c', WORKER, ROOT, kind, path, cache], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout)


def main():
    for mb in [int(a) for a in sys.argv[1:]] or [10]:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'text.txt')
            make_text(path, mb)
            size = os.path.getsize(path) / 1e6
            first = measure('ours', path, d)
            again = measure('ours', path, d)
            lecture = measure('lecture', path, d)
            print(f"{size:.0f} MB text, {first['tokens']:,} characters, vocabulary {first['vocab']:,}")
            print(f"  gpt.py first preparation: {first['seconds']:.2f} s, +{first['extra_mb']:.0f} MB peak "
                  f"({first['extra_mb'] / size:.2f}x the file)")
            print(f"  gpt.py later runs (cache): {again['seconds']:.3f} s, +{again['extra_mb']:.0f} MB")
            print(f"  lecture torch.tensor(encode(text)): {lecture['seconds']:.2f} s, +{lecture['extra_mb']:.0f} MB "
                  f"peak ({lecture['extra_mb'] / size:.1f}x the file)")


if __name__ == '__main__':
    main()

""" the text and its data: the default text downloaded, the tokenizer and your own vocabulary, the encoded data on
disk, the split and get_batch, and the windows of the final loss over the val split """
import hashlib
import http.server
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gpt
from conftest import ROOT, TINY, load, run_script
from test_cli import STEP_LINE, one_line_error


# the tokenizer and your own text

def test_encode_decode_round_trip():
    tok = gpt.CharTokenizer(sorted(set("hello world!")))
    assert tok.encode("hello") == [tok.stoi[c] for c in "hello"]
    assert tok.decode(tok.encode("hold, world!".replace(',', ''))) == "hold world!"


def test_encoding_an_unseen_character_names_it():
    tok = gpt.CharTokenizer(list("abc"))
    with pytest.raises(ValueError, match="'xz'"):
        tok.encode("abzcx")


def test_train_on_your_own_text_with_its_own_vocabulary(workdir):
    (workdir / 'mine.txt').write_text('αβγ δέζ ηθι! ' * 300, encoding='utf-8')
    p = run_script(workdir, *TINY, '--input_file=mine.txt', '--prompt=αβ')
    assert p.returncode == 0, p.stderr
    assert load(workdir / 'out' / 'ckpt.pt')['chars'] == ''.join(sorted(set('αβγ δέζ ηθι!')))
    sample = p.stdout.split('saved ', 1)[1].split('\n', 1)[1].removeprefix('αβ')
    assert set(sample.strip()) <= set('αβγ δέζ ηθι!\n')


def test_thousands_of_distinct_characters_train_save_resume_and_sample(workdir):
    rng = __import__('random').Random(0)
    text = ''.join(chr(0x4E00 + rng.randrange(3000)) + ('。\n' if i % 17 == 16 else '') for i in range(60000))
    (workdir / 'zh.txt').write_text(text, encoding='utf-8')
    first = run_script(workdir, *TINY, '--input_file=zh.txt')
    assert first.returncode == 0, first.stderr
    vocab = load(workdir / 'out' / 'ckpt.pt')['chars']
    assert len(vocab) > 2900 and vocab == ''.join(sorted(set(text)))
    resumed = run_script(workdir, *TINY, '--input_file=zh.txt', '--init_from=resume', '--max_iters=30',
                         f'--prompt={text[:3]}')
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _, _ in STEP_LINE.findall(resumed.stdout)] == ['30']
    sample = resumed.stdout.split('saved ', 1)[1].split('\n', 1)[1]
    assert sample.startswith(text[:3])
    sample = sample[3:]
    assert len(sample.strip()) >= 20 and set(sample.strip()) <= set(vocab)


# the default text, downloaded

class OneFile(http.server.BaseHTTPRequestHandler):
    body = b''
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)
    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(('127.0.0.1', 0), OneFile)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/input.txt'
    httpd.shutdown()


def test_the_default_text_is_downloaded_when_missing_and_checked(tmp_path, server):
    OneFile.body = open(os.path.join(ROOT, 'input.txt'), 'rb').read()[:5000]
    sha = hashlib.sha256(OneFile.body).hexdigest()
    bad = run_script(tmp_path, *TINY, f'--data_url={server}', f'--data_sha256={"0" * 64}')
    assert 'checksum' in one_line_error(bad) and not (tmp_path / 'input.txt').exists()
    p = run_script(tmp_path, *TINY, f'--data_url={server}', f'--data_sha256={sha}')
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'input.txt').read_bytes() == OneFile.body
    assert STEP_LINE.findall(p.stdout)


def test_offline_says_where_to_put_the_file(tmp_path):
    line = one_line_error(run_script(tmp_path, *TINY, '--data_url=http://127.0.0.1:9/input.txt'))
    assert 'input.txt' in line and '--input_file' in line


# the encoded data on disk

def test_prepared_data_equals_the_lectures_encoding(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    (tmp_path / 'in.txt').write_text(text, encoding='utf-8')
    chars, data = gpt.prepare_data(str(tmp_path / 'in.txt'), str(tmp_path))
    assert chars == sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    assert data.dtype == np.uint16
    assert data.tolist() == [stoi[c] for c in text]


def test_the_cache_is_reused_and_rebuilt_when_the_text_changes(tmp_path):
    path = tmp_path / 'in.txt'
    path.write_text("abcabc", encoding='utf-8')
    gpt.prepare_data(str(path), str(tmp_path))
    bin_path = tmp_path / 'data.bin'
    os.utime(bin_path, ns=(1, 1))  # mark the cache: a rebuild would give it a new time
    chars, data = gpt.prepare_data(str(path), str(tmp_path))
    assert os.stat(bin_path).st_mtime_ns == 1
    path.write_text("xyzzy!", encoding='utf-8')
    chars, data = gpt.prepare_data(str(path), str(tmp_path))
    assert chars == list("!xyz") and gpt.CharTokenizer(chars).decode(data.tolist()) == "xyzzy!"


def test_a_vocabulary_past_65536_characters_is_stored_as_uint32(tmp_path):
    text = ''.join(chr(c) for c in range(0x10000, 0x10000 + 70000)) + 'ab'
    (tmp_path / 'in.txt').write_text(text, encoding='utf-8')
    chars, data = gpt.prepare_data(str(tmp_path / 'in.txt'), str(tmp_path))
    assert data.dtype == np.uint32 and len(chars) == 70002
    assert gpt.CharTokenizer(chars).decode(data[-5:].tolist()) == text[-5:]


def test_a_byte_order_mark_is_not_a_character(tmp_path):
    (tmp_path / 'in.txt').write_bytes('\ufeffhello'.encode('utf-8'))
    chars, data = gpt.prepare_data(str(tmp_path / 'in.txt'), str(tmp_path))
    assert chars == list('ehlo') and len(data) == 5


def test_preparations_never_share_a_temporary_file(tmp_path):
    (tmp_path / 'in.txt').write_text('abc' * 100, encoding='utf-8')
    (tmp_path / 'data.bin.tmp').mkdir()  # where every run used to write: another run's, in the way
    chars, data = gpt.prepare_data(str(tmp_path / 'in.txt'), str(tmp_path))
    assert chars == list('abc') and len(data) == 300


def test_an_interrupted_preparation_leaves_no_file_behind(tmp_path, monkeypatch):
    (tmp_path / 'in.txt').write_text('abc' * 100, encoding='utf-8')
    calls, read = [], gpt.read_text_chunks
    def interrupted(path):
        calls.append(path)
        if len(calls) == 2:  # in the second pass, while writing
            raise KeyboardInterrupt
        return read(path)
    monkeypatch.setattr(gpt, 'read_text_chunks', interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpt.prepare_data(str(tmp_path / 'in.txt'), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['in.txt']


# the split and get_batch

def test_split_is_90_10_and_targets_are_inputs_shifted_by_one(tmp_path):
    text = ''.join(chr(97 + (i * 7) % 26) for i in range(1000))
    (tmp_path / 'in.txt').write_text(text, encoding='utf-8')
    cfg = SimpleNamespace(input_file=str(tmp_path / 'in.txt'), out_dir=str(tmp_path), block_size=8)
    chars, splits = gpt.load_splits(cfg)
    assert len(splits['train']) == 900 and len(splits['val']) == 100
    tok = gpt.CharTokenizer(chars)
    assert tok.decode(splits['train'].tolist()) + tok.decode(splits['val'].tolist()) == text
    x, y = gpt.get_batch(splits['train'], 8, 5, torch.device('cpu'))
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x.tolist():  # each row is a real chunk of the text
        assert tok.decode(row) in text


# the final loss over the val split

def test_the_final_loss_reads_every_window_of_a_small_split_and_spread_windows_of_a_big_one():
    starts, n = gpt.final_windows(111_541, 64)  # tiny Shakespeare's val split
    assert n == len(starts) == 1742 and list(starts[:3]) == [0, 64, 128]
    starts, n = gpt.final_windows(10_000_001, 64)  # a 100 MB text's
    assert len(starts) == (1 << 17) // 64 and n == 156_250
    assert starts[0] == 0 and starts[-1] == (n - 1) * 64 and (np.diff(starts) > 0).all()
    assert np.ptp(np.diff(starts)) <= 64  # evenly spread


def test_the_final_loss_is_the_exact_mean_over_a_small_split_and_a_stop_skips_it(capsys):
    torch.manual_seed(0)
    model = gpt.GPTLanguageModel(gpt.GPTConfig(vocab_size=5, block_size=8, n_embd=8, n_head=2, n_layer=1))
    data = np.random.default_rng(0).integers(0, 5, 1001).astype(np.uint16)
    cfg = gpt.SimpleNamespace(block_size=8, batch_size=3)  # batches of 12 windows: the last one has 5
    run = gpt.LoopState(model=model, splits={'val': data}, device=torch.device('cpu'), ctx=gpt.nullcontext(),
                        signals=[2])  # a stop that came before does not count
    whole = gpt.final_loss(run, cfg)
    x = torch.from_numpy(data[:1000].astype(np.int64)).view(-1, 8)
    y = torch.from_numpy(data[1:1001].astype(np.int64)).view(-1, 8)
    assert whole == pytest.approx(model(x, y)[1].item(), abs=1e-5)
    assert 'val loss over the whole split' in capsys.readouterr().out

    class StopWhileItRuns(list):  # no stop when the pass begins, one from its first batch on
        def __len__(self):
            self.looks = getattr(self, 'looks', 0) + 1
            return int(self.looks > 1)
    run.signals = StopWhileItRuns()
    assert gpt.final_loss(run, cfg) is None and 'is skipped: stopped' in capsys.readouterr().out


def test_a_big_texts_final_line_says_it_read_spread_windows(workdir):
    text = (workdir / 'input.txt').read_text(encoding='utf-8')
    (workdir / 'big.txt').write_text(text * 80, encoding='utf-8')  # a val split of 160,000 characters
    p = run_script(workdir, *TINY, '--input_file=big.txt', '--max_iters=10')
    assert p.returncode == 0, p.stderr
    assert "step 10: val loss over 8,192 windows spread over the split's 9,999" in p.stdout

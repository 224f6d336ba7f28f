""" the tokenizer, the encoded data on disk, the split and get_batch """
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gpt


def test_encode_decode_round_trip():
    tok = gpt.CharTokenizer(sorted(set("hello world!")))
    assert tok.encode("hello") == [tok.stoi[c] for c in "hello"]
    assert tok.decode(tok.encode("hold, world!".replace(',', ''))) == "hold world!"


def test_encoding_an_unseen_character_names_it():
    tok = gpt.CharTokenizer(list("abc"))
    with pytest.raises(ValueError, match="'xz'"):
        tok.encode("abzcx")


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


def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = SimpleNamespace(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10)
    lrs = [gpt.get_lr(s, cfg, 100) for s in range(101)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))

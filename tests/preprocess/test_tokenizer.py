"""Tokenizer: Gemma ids, loc/seg tokens, and decoding as transformers does for PaliGemma."""

import os

import numpy as np
import pytest

import spm_fixture
from paligemma_jax import errors
from paligemma_jax.preprocess.tokenizer import Tokenizer, loc_token, seg_token

TEXTS = ["caption en\n", "answer en what is on the bench?\n", "détecté à 12:30 ☃ 😀", "a\tb  c\n\n",
         "detect cat ; dog\n", "<loc0012><loc1023><seg000><seg127> cat ; <loc0000>", "", " ", "12345.5"]


@pytest.fixture(scope="module")
def tok(spm_model_path):
  return Tokenizer(spm_model_path)


@pytest.fixture(scope="module")
def hf_tok(spm_model_path):
  transformers = pytest.importorskip("transformers")
  return transformers.GemmaTokenizer.from_pretrained(os.path.dirname(spm_model_path), local_files_only=True)


def test_special_ids_and_vocab(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == spm_fixture.VOCAB_SIZE == 1536
  assert tok.token_to_id("<mask>") == 4


def test_loc_seg_tokens_follow_base_vocab(tok):
  assert (loc_token(7), seg_token(7)) == ("<loc0007>", "<seg007>")
  assert [tok.token_to_id(loc_token(i)) for i in (0, 12, 1023)] == [384, 396, 1407]
  assert [tok.token_to_id(seg_token(i)) for i in (0, 127)] == [1408, 1535]
  assert tok.encode("<loc0012>") == [396]
  assert tok.encode("<loc0012><seg005>") == [396, 1413]


def test_adds_missing_loc_seg_tokens(tmp_path, tok):
  plain = Tokenizer(spm_fixture.build_spm_model(tmp_path / "plain.model", with_loc_seg=False))
  assert plain.vocab_size == tok.vocab_size
  assert plain.token_to_id("<loc0000>") == 384 and plain.token_to_id("<seg127>") == 1535
  for text in TEXTS:
    assert plain.encode(text) == tok.encode(text), text


def test_encode_adds_no_bos_eos(tok):
  ids = tok.encode("caption en")
  assert ids and tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.encode("") == []


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_tok, text):
  assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


def test_decode_skips_specials_keeps_loc_seg(tok):
  cat = tok.encode(" cat")
  ids = [2, 396, 1413, *cat, 4, 3, 1, 0, 0]
  assert tok.decode(ids) == "<loc0012><seg005> cat"
  assert tok.decode(ids, skip_special=False) == "<bos><loc0012><seg005> cat<mask><unk><eos><pad><pad>"


def test_decode_drops_out_of_vocab_ids(tok):
  """The image token (1536) and embedding padding rows (up to 1599) decode to nothing."""
  cat = tok.encode("cat")
  assert tok.decode([1536, *cat, 1599, 10**6, -1]) == "cat"
  assert tok.decode(np.array([[1536, 1599]], np.int32)) == ""
  assert tok.decode(np.array(cat + [1, 0, 0], np.int32)) == "cat"


def test_decode_matches_transformers(tok, hf_tok):
  """transformers' skip_special_tokens=True drops pad/bos/eos/unk/mask and keeps loc/seg tokens."""
  rng = np.random.default_rng(0)
  emoji = tok.encode("😀")  # Byte-fallback pieces; random bytes would be invalid UTF-8.
  for _ in range(20):
    ids = rng.integers(261, tok.vocab_size, 30).tolist()  # 5..260 are the byte pieces.
    ids[rng.integers(0, 30)] = int(rng.integers(0, 5))
    k = int(rng.integers(0, 30))
    ids[k:k] = emoji
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), ids
  ids = [2, 396, 1413, *tok.encode(" cat ; "), 400, 500, 600, 700, *tok.encode(" dog"), 1, 0]
  assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True) == (
    "<loc0012><seg005> cat ; <loc0016><loc0116><loc0216><loc0316> dog")


def test_missing_file(tmp_path):
  path = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    Tokenizer(path)


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model"])
def test_corrupt_file(tmp_path, content):
  path = tmp_path / "bad.model"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="bad.model"):
    Tokenizer(path)


def test_unknown_piece(tok):
  assert tok.token_to_id("<unk>") == 3
  with pytest.raises(KeyError):
    tok.token_to_id("<loc9999>")


@pytest.mark.parametrize("text", ["\ud83d", "caption \udcff en"])
def test_text_that_is_not_unicode_is_an_input_error_naming_the_character(tok, text):
  # A lone surrogate (JSON "\ud83d", or an undecodable command-line byte) made SentencePiece raise
  # a RuntimeError that stopped whole runs; it is now the example's own error.
  with pytest.raises(errors.InputError, match="not valid Unicode.*surrogate"):
    tok.encode(text)


def test_a_piece_alone_as_log_probs_show_it(tok):
  """Its text decoded alone (specials by name); its bytes that text's UTF-8, but a byte-fallback
  piece's raw byte: the bytes of a text's tokens join into the text's UTF-8."""
  text = "détecté ☃ 😀 on the bench\n<loc0012>"
  ids = tok.encode(text)
  pieces = [tok.piece(i) for i in ids]
  assert b"".join(raw for _, raw in pieces) == text.encode("utf-8")
  raw_bytes = {i: int(tok._sp.id_to_piece(i)[3:5], 16) for i in ids if tok._sp.is_byte(i)}
  assert len(raw_bytes) > 4 and all(tok.piece(i) == ("\ufffd", bytes([b]))
                                    for i, b in raw_bytes.items())  # "<0xC3>": b"\xc3".
  assert tok.piece(tok.token_to_id("<loc0012>")) == ("<loc0012>", b"<loc0012>")
  assert tok.piece(tok.eos_id) == ("<eos>", b"<eos>") and tok.piece(tok.pad_id)[0] == "<pad>"
  assert tok.piece(tok.vocab_size) == ("", b"") and tok.piece(-1) == ("", b"")
  assert all(text == tok.decode([i]) for i, (text, _) in zip(ids, pieces))

"""Builds a small SentencePiece model laid out like PaliGemma's Gemma tokenizer.

Ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, then BPE pieces and the 256 byte-fallback pieces
up to 384; then <loc0000>..<loc1023> (384..1407) and <seg000>..<seg127> (1408..1535) as user-defined
pieces, as in the real file where they follow the base vocabulary. The image token is 1536 (not a
piece). Training is deterministic and offline, so tests can build it on the fly.
"""

import io
import itertools

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

BASE_VOCAB_SIZE = 384
NUM_LOC, NUM_SEG = 1024, 128
VOCAB_SIZE = BASE_VOCAB_SIZE + NUM_LOC + NUM_SEG  # 1536
IMAGE_TOKEN_ID = VOCAB_SIZE

_WORDS = (
  "a the cat dog sits on bench red blue green car tree house person man woman child "
  "what is in image picture photo caption answer detect segment ocr describe this "
  "left right top bottom small large two three many near far street sky water white black"
).split()


def _corpus():
  """Deterministic sentences: words, digits, punctuation and newlines, ASCII only."""
  for i, (a, b, c) in enumerate(itertools.product(_WORDS[:24], _WORDS[8:32], _WORDS[::3])):
    if i >= 6000:
      return
    yield f"{a} {b} {c} {i % 1000}{'?' if i % 3 else '.'}{chr(10) if i % 5 == 0 else ''} ; {c}, {a}!"


def add_loc_seg_pieces(proto):
  """Appends <locNNNN> and <segNNN> as user-defined pieces (skipping ones already there)."""
  have = {p.piece for p in proto.pieces}
  names = [f"<loc{i:04d}>" for i in range(NUM_LOC)] + [f"<seg{i:03d}>" for i in range(NUM_SEG)]
  for name in names:
    if name not in have:
      proto.pieces.add(piece=name, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  return proto


def build_spm_model(path, with_loc_seg=True):
  """Trains the model and writes it to `path`; returns `path`."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=_corpus(), model_writer=buf, model_type="bpe", vocab_size=BASE_VOCAB_SIZE,
    pad_id=0, eos_id=1, bos_id=2, unk_id=3,
    pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
    user_defined_symbols=["<mask>"], byte_fallback=True, normalization_rule_name="identity",
    add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
    allow_whitespace_only_pieces=True, character_coverage=1.0, shuffle_input_sentence=False,
    num_threads=1, minloglevel=2)
  proto = model_pb2.ModelProto.FromString(buf.getvalue())
  assert len(proto.pieces) == BASE_VOCAB_SIZE, len(proto.pieces)
  if with_loc_seg:
    add_loc_seg_pieces(proto)
  with open(path, "wb") as f:
    f.write(proto.SerializeToString())
  return path

"""The Gemma SentencePiece tokenizer, with PaliGemma's location and segmentation tokens.

PaliGemma answers detection and segmentation queries with `<locNNNN>` (1024 coordinate bins)
and `<segNNN>` (128 mask codes) tokens, which follow the base vocabulary as user-defined pieces.
A plain Gemma `tokenizer.model` lacks them; they are added here so each encodes to one id.

Decoding follows transformers' `decode(..., skip_special_tokens=True)` for PaliGemma: control
pieces (pad, bos, eos), unk and `<mask>` are dropped, loc/seg tokens are kept (they are the
answer). Ids at or past the vocabulary size (the `<image>` token, embedding padding rows) are
always dropped, so decoding sampled ids never fails.
"""

import os

import numpy as np
import sentencepiece as spm

from paligemma_jax import errors

NUM_LOC = 1024  # <loc0000> .. <loc1023>: coordinate bins.
SEG_CODEBOOK_SIZE = 128  # <seg000> .. <seg127>: entries of the mask VQ-VAE codebook.


def loc_token(i: int) -> str:
  """The token for coordinate bin i (0..1023)."""
  return f"<loc{i:04d}>"


def seg_token(i: int) -> str:
  """The token for segmentation codebook entry i (0..127)."""
  return f"<seg{i:03d}>"


EXTRA_TOKENS = tuple(loc_token(i) for i in range(NUM_LOC)) + tuple(seg_token(i) for i in range(SEG_CODEBOOK_SIZE))


def _with_extra_tokens(model_bytes: bytes, missing) -> bytes:
  """Appends the missing tokens to the model proto as user-defined pieces."""
  from sentencepiece import sentencepiece_model_pb2 as model_pb2  # Needs protobuf; rarely used.
  proto = model_pb2.ModelProto.FromString(model_bytes)
  for piece in missing:
    proto.pieces.add(piece=piece, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  return proto.SerializeToString()


class Tokenizer:
  """SentencePiece wrapper: plain encode (no bos/eos), forgiving decode, special ids."""

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Tokenizer model not found: {path!r}")
    with open(path, "rb") as f:
      model_bytes = f.read()
    try:  # An empty proto parses fine, so check it is not empty.
      sp = spm.SentencePieceProcessor(model_proto=model_bytes) if model_bytes else None
    except Exception:  # sentencepiece raises RuntimeError or OSError depending on the version.
      sp = None
    if sp is None or sp.get_piece_size() == 0:
      raise errors.InputError(f"Not a valid SentencePiece model: {path!r}")
    missing = [t for t in EXTRA_TOKENS if sp.piece_to_id(t) == sp.unk_id()]
    if missing:
      sp = spm.SentencePieceProcessor(model_proto=_with_extra_tokens(model_bytes, missing))
    self.path = path
    self._sp = sp
    # Dropped by skip_special; other control pieces decode to "" anyway.
    self._special = {i for i in (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) if i >= 0}
    if sp.piece_to_id("<mask>") != sp.unk_id():
      self._special.add(sp.piece_to_id("<mask>"))

  @property
  def vocab_size(self) -> int:
    """Number of SentencePiece pieces (loc/seg included); the model's embedding may have more rows."""
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos or eos.

    Raises InputError for text that is not valid Unicode (a lone surrogate from JSON "\\ud83d", or
    an undecodable command-line byte), which SentencePiece would reject with a RuntimeError.
    """
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise errors.InputError(f"text is not valid Unicode ({e.reason} at character {e.start}: "
                              f"{text[e.start:e.end]!r})", reason="invalid Unicode") from None
    return self._sp.encode(text)

  def token_to_id(self, token: str) -> int:
    """Id of one piece, e.g. `<loc0012>`; raises KeyError for unknown pieces."""
    i = self._sp.piece_to_id(token)
    if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
      raise KeyError(f"{token!r} is not in the vocabulary of {self.path!r}")
    return i

  def decode(self, ids, skip_special: bool = True) -> str:
    """Text of `ids` (any int sequence or array); out-of-vocabulary ids are dropped.

    With skip_special=False, special pieces are written by name (`<eos>`, `<pad>`, ...).
    """
    out, run = [], []
    for i in np.asarray(ids, np.int64).reshape(-1).tolist():
      if not 0 <= i < self.vocab_size:
        continue
      if i in self._special:
        if not skip_special:
          out.append(self._sp.decode(run) + self._sp.id_to_piece(i))
          run = []
        continue
      run.append(i)
    return "".join(out) + self._sp.decode(run)

  def piece(self, i: int) -> tuple[str, bytes]:
    """One id alone, as log-probs show it -> (text, bytes).

    text: what decoding the id alone gives, special pieces by name (`<eos>`); a byte-fallback
    piece of a multi-byte character alone is U+FFFD. bytes: the text's UTF-8, except for a
    byte-fallback piece (`<0xE2>`): its one raw byte, so the bytes of the tokens a text decodes
    from (special ones aside) joined are that text's UTF-8 exactly (OpenAI's `bytes`). An id
    outside the vocabulary: ("", b"").
    """
    if not 0 <= i < self.vocab_size:
      return "", b""
    text = self.decode([i], skip_special=False)
    if self._sp.is_byte(i):
      return text, bytes([int(self._sp.id_to_piece(i)[3:5], 16)])  # "<0xE2>"
    return text, text.encode("utf-8")

"""Expected errors carry their reason; a result keeps it with the message, as a plain string."""

import json

from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import inference


def test_a_kept_message_is_a_json_string_with_its_reason():
  kept = errors.message(errors.InputError("Image not found: a.png", reason="image not found"))
  assert kept == "Image not found: a.png" and json.dumps({"error": kept}) == (
      '{"error": "Image not found: a.png"}')
  assert errors.reason(kept) == "image not found"
  assert errors.reason("anything else") == "anything else"  # No reason: the message counts.


def test_reasons_come_from_where_the_error_is_raised(tmp_path):
  """Not from the wording: summaries count these categories whatever the messages say."""
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"a": \n\xff\n["\\ud83d"]\n')
  assert [errors.reason(line.error) for line in files.read_jsonl(str(path))] == [
      "invalid JSON", "invalid UTF-8", "invalid Unicode"]
  missing = batching.prepare(inference.Example(str(tmp_path / "none.png"), "caption en"),
                             lambda num_images: [], 16)
  assert errors.reason(missing.error) == "image not found"
  path.write_bytes(b"not an image")
  unreadable = batching.prepare(inference.Example(str(path), "caption en"),
                                lambda num_images: [], 16)
  assert errors.reason(unreadable.error) == "unreadable image"

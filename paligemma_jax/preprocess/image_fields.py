"""The images an example names: one (`image`) or several (`images`, in the order the prompt reads
them). Every entry point reads them here, so a JSONL line, a dataset line, a training line and a
Python `Example` follow one rule: exactly one of the two fields; `images` a non-empty list.

A prompt with k images holds k * N image tokens, each image's N in order, before <bos> (as
transformers' PaliGemmaProcessor lays out `images=[[a, b], ...]` and big_vision's multi-image
transfers do).
"""

from paligemma_jax import errors


def sources(image, images) -> list:
  """[image] or images, checked: an InputError (with a short `reason`) where there is no image,
  both are given, or `images` is not a non-empty list."""
  if images is None:
    if image is None:
      raise errors.InputError("no image: give 'image' or 'images'", reason="missing 'image'")
    return [image]
  if image is not None:
    raise errors.InputError("give 'image' or 'images', not both", reason="invalid 'images'")
  if not isinstance(images, (list, tuple)) or not images:
    raise errors.InputError("'images' must be a non-empty list", reason="invalid 'images'")
  return list(images)


def paths(record: dict) -> list[str]:
  """The image paths of a parsed JSON line (`image`: a string, or `images`: a non-empty list of
  strings), unresolved; InputError as `sources`."""
  found = sources(record.get("image"), record.get("images"))
  if not all(isinstance(p, str) for p in found):
    key = "image" if "images" not in record else "images"
    what = "a string" if key == "image" else "a list of strings"
    raise errors.InputError(f"'{key}' must be {what}", reason=f"invalid '{key}'")
  return found


def fields(image, images) -> dict:
  """An example's image field as given: {"image": image}, or {"images": [...]} where it has
  `images`; what result lines echo (see `given`)."""
  return {"image": image} if images is None else {"images": list(images)}


def given(record: dict) -> dict:
  """The image field of a line or result as given: {"image": ...} or {"images": [...]}; what
  result lines echo and what a resumed run compares."""
  return {k: record[k] for k in ("image", "images") if k in record}

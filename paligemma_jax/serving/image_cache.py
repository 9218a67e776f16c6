"""The image-feature cache: SigLIP + projector output by image, least recently used out.

Keyed by the image bytes' sha256 and the model's resolution, so identical uploads share one
image-tower run (and skip decoding the file). Only the features are cached: in PaliGemma's
full-attention prefix the image tokens attend to the prompt, so their keys and values differ
with every prompt. Not thread-safe: the engine calls it under its lock.
"""

import collections
import hashlib


def image_key(image: bytes, image_size: int) -> tuple:
  return hashlib.sha256(image).hexdigest(), image_size


class ImageCache:
  def __init__(self, capacity: int):
    self.capacity = capacity
    self._entries = collections.OrderedDict()  # key -> features [N, D]; LRU first.

  def __len__(self) -> int:
    return len(self._entries)

  def get(self, key):
    """The features, marked as just used, or None."""
    features = self._entries.get(key)
    if features is not None:
      self._entries.move_to_end(key)
    return features

  def put(self, key, features) -> None:
    if self.capacity > 0:
      self._entries[key] = features
      while len(self._entries) > self.capacity:
        self._entries.popitem(last=False)

"""Captioning: {"image", "prompt": "caption en", "captions": [str, ...]}; CIDEr-D over the corpus."""

from paligemma_jax.tasks import base
from paligemma_jax.tasks import metrics


class Caption(base.Task):
  name = "caption"
  max_new_tokens = 64

  def check(self, record, resolve):
    base.strings(record, "captions")

  def metrics(self, lines):
    if not lines:
      return {"cider": float("nan")}
    return {"cider": metrics.cider([p["text"] for p in lines],
                                   [p["reference"]["captions"] for p in lines])[0]}


TASKS = (Caption,)

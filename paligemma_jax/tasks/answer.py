"""Short answers scored against reference answers: VQA accuracy, exact match, ANLS, ChartQA.

Dataset lines: {"image", "prompt": "answer en ...", "answers": [str, ...]} (a lone string is one
answer). Each prediction gets `score`; the metric is its mean.
"""

from paligemma_jax.tasks import base
from paligemma_jax.tasks import metrics


class Answer(base.Task):
  max_new_tokens = 32
  metric_name = ""

  @staticmethod
  def score(text: str, answers: list) -> float:
    raise NotImplementedError

  def check(self, record, resolve):
    base.strings(record, "answers")

  def example_fields(self, row, result):
    return {**super().example_fields(row, result),
            "score": self.score(result["text"], row.record["answers"])}

  def metrics(self, lines):
    return {self.metric_name: base.mean(p["score"] for p in lines)}


class Vqa(Answer):
  """VQAv2 accuracy: official normalisation, leave-one-out over the human answers."""
  name, metric_name = "vqa", "vqa_accuracy"
  score = staticmethod(metrics.vqa_accuracy)


class ExactMatch(Answer):
  name, metric_name = "exact_match", "exact_match"
  score = staticmethod(metrics.exact_match)


class Anls(Answer):
  """Average normalised Levenshtein similarity (DocVQA, InfographicVQA)."""
  name, metric_name = "anls", "anls"
  score = staticmethod(metrics.anls)


class Relaxed(Answer):
  """ChartQA: numbers within 5% count as right."""
  name, metric_name = "relaxed", "relaxed_accuracy"
  score = staticmethod(lambda text, answers: max(metrics.relaxed_accuracy(text, a) for a in answers))


TASKS = (Vqa, ExactMatch, Anls, Relaxed)

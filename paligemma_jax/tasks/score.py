"""Scoring given answers: teacher-forced log-likelihood of each suffix (multiple choice, perplexity).

Dataset lines: {"image", "prompt", "suffixes": [str, ...], "answer": index (optional)}. Each
prediction has per suffix the summed log-prob, the mean per target token and the token count, and
`choice`, the likeliest suffix; with `answer`, whether the choice (and the length-normalised
choice) is right. Metrics: mean log-prob per token, perplexity, and accuracy where answers exist.
"""

import math

import numpy as np

from paligemma_jax.tasks import base


def perplexity(logprob_sums, token_counts) -> float:
  """exp(-sum log p / number of tokens) over a corpus of scored suffixes; NaN when empty."""
  n = sum(token_counts)
  return math.exp(-sum(logprob_sums) / n) if n else float("nan")


class Score(base.Task):
  name = "score"
  max_new_tokens = 1  # Nothing is generated.
  scores_suffixes = True

  def check(self, record, resolve):
    base.strings(record, "suffixes")
    answer = record.get("answer")
    if answer is not None and (not isinstance(answer, int) or isinstance(answer, bool)
                               or not 0 <= answer < len(record["suffixes"])):
      raise base.Invalid("invalid 'answer'", f"'answer' must be an index into the "
                                             f"{len(record['suffixes'])} suffixes")

  def example_fields(self, row, result):
    out = {k: result[k] for k in ("logprob", "mean_logprob", "num_tokens", "choice")}
    answer = row.record.get("answer")
    if answer is not None:
      out["correct"] = out["choice"] == answer
      out["correct_normalized"] = int(np.argmax(out["mean_logprob"])) == answer
    return out

  def metrics(self, lines):
    sums = [s for p in lines for s in p["logprob"]]
    counts = [n for p in lines for n in p["num_tokens"]]
    out = {"mean_logprob": sum(sums) / sum(counts) if counts else float("nan"),
           "perplexity": perplexity(sums, counts)}
    answered = [p for p in lines if "correct" in p]
    if answered:
      right = [(p["logprob"][p["reference"]["answer"]], p["num_tokens"][p["reference"]["answer"]])
               for p in answered]
      out.update(accuracy=base.mean(p["correct"] for p in answered),
                 accuracy_normalized=base.mean(p["correct_normalized"] for p in answered),
                 answer_perplexity=perplexity(*zip(*right)), answered=len(answered))
    return out


TASKS = (Score,)

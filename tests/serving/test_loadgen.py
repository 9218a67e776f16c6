"""The load generator's baselines: static batches formed as requests arrive, the ideal of
continuous batching from measured costs, and those costs measured on the engine's programs."""

import numpy as np
import pytest

from paligemma_jax.checkpoints import loading
from paligemma_jax.serving import loadgen


def test_static_batches_take_only_the_requests_that_have_arrived():
  """Slots 2, each batch 1 s: the third request (at 0.5 s) waits for the first batch, and runs
  alone; the fourth arrives after it: the device idles until 3.0 s (counted, not slept), then
  runs it alone as the fifth has not arrived yet. Offline batching would have run 3 batches."""
  arrival = np.array([0.0, 0.0, 0.5, 3.0, 3.1])
  ran = []
  timeline = loadgen.static_timeline(arrival, 2, lambda batch: ran.append(batch) or 1.0)
  assert timeline == [([0, 1], 0.0, 1.0), ([2], 1.0, 2.0), ([3], 3.0, 4.0), ([4], 4.0, 5.0)]
  assert ran == [t[0] for t in timeline]


def test_static_batches_all_at_once_and_out_of_order_arrivals():
  at_once = loadgen.static_timeline(np.zeros(5), 2, lambda batch: 0.5 * len(batch))
  assert at_once == [([0, 1], 0.0, 1.0), ([2, 3], 1.0, 2.0), ([4], 2.0, 2.5)]
  # Arrival order, whatever the order given; a batch's duration moves the clock.
  timeline = loadgen.static_timeline(np.array([2.0, 0.0, 1.0]), 3,
                                     lambda batch: {1: 1.5}.get(len(batch), 9.0))
  assert timeline == [([1], 0.0, 1.5), ([2], 1.5, 3.0), ([0], 3.0, 4.5)]


def test_ideal_counts_full_batches_of_prefill_and_decode_steps():
  """16 requests of 10 tokens on 8 slots: 2 full prefill batches (2 s each) and 144 tokens after
  the first ones, 18 steps at the full batch (0.5 s): 4 + 9 = 13 s; 4 images in tower batches
  of 8 (1 s) add half a batch. A late last arrival bounds it instead: 20 s + its prefill's
  share + its 4 later steps."""
  ideal = dict(requests=16, useful_tokens=160, slots=8, prefill_s=2.0, step_s=0.5)
  assert loadgen.ideal_seconds(**ideal) == pytest.approx(13.0)
  assert loadgen.ideal_seconds(**ideal, images=4, tower_s=1.0) == pytest.approx(13.5)
  assert loadgen.ideal_seconds(**ideal, last_arrival=20.0, last_tokens=5) == pytest.approx(22.25)
  assert loadgen.ideal_seconds(**ideal, last_arrival=1.0, last_tokens=5) == pytest.approx(13.0)
  # One slot: every step serves one request.
  assert loadgen.ideal_seconds(requests=2, useful_tokens=6, slots=1, prefill_s=1.0,
                               step_s=1.0) == pytest.approx(6.0)


def test_in_order_of_arrival_the_last_requests_drain_with_slots_empty():
  """2 slots, 1 s steps, free prefills: requests of 3, 5 and 2 tokens at once decode 2, 4 and 1
  tokens after their prefills' first; the third takes the first's slot after step 2 and ends
  at step 3, the second runs alone at step 4: 4 s where the ideal counts 7 / 2 = 3.5 s. A late
  arrival waits for nothing but itself; prefills and images add their share of a batch."""
  tokens, free = [3, 5, 2], dict(slots=2, prefill_s=[0.0] * 3, step_s=1.0)
  assert loadgen.first_come_seconds(np.zeros(3), tokens, **free) == pytest.approx(4.0)
  assert loadgen.ideal_seconds(requests=3, useful_tokens=10, slots=2, prefill_s=0.0,
                               step_s=1.0) == pytest.approx(3.5)
  assert loadgen.first_come_seconds(np.array([0.0, 0.0, 10.0]), tokens, **free) == pytest.approx(11.0)
  # Arrival order, whatever the order given; one-token answers take no step.
  assert loadgen.first_come_seconds(np.array([10.0, 0.0, 0.0]), [2, 1, 1], **free) == pytest.approx(11.0)
  assert loadgen.first_come_seconds(np.zeros(3), tokens, slots=2, prefill_s=[2.0, 2.0, 4.0],
                                    step_s=1.0, images=2, tower_s=1.0) == pytest.approx(9.0)
  # Requests that answered nothing are left out; image batches are charged as prompts need
  # them, not before the first arrival.
  assert loadgen.first_come_seconds(np.zeros(3), [3, 0, 2], slots=2, prefill_s=[2.0] * 3,
                                    step_s=1.0) == pytest.approx(4.0)
  assert loadgen.first_come_seconds(np.zeros(2), [0, 0], slots=2, prefill_s=[2.0] * 2,
                                    step_s=1.0, images=1, tower_s=1.0) == 0.0  # main: rate 0.
  assert loadgen.first_come_seconds(np.array([0.0, 10.0]), [2, 2], slots=2, prefill_s=[0.0] * 2,
                                    step_s=1.0, images=2, tower_s=1.0) == pytest.approx(11.5)
  # Enough slots for all: the longest answer alone bounds it.
  assert loadgen.first_come_seconds(np.zeros(3), tokens, slots=4, prefill_s=[0.0] * 3,
                                    step_s=1.0) == pytest.approx(4.0)


def test_request_sets_saturated_and_poisson():
  at_once = loadgen.request_set(5, 0.0, 2, 4, seed=1)
  assert (at_once["arrival"] == 0).all()
  poisson = loadgen.request_set(400, 2.0, 2, 4, seed=1)
  gaps = np.diff(poisson["arrival"])
  assert poisson["arrival"][0] == 0 and (gaps >= 0).all() and 0.4 < gaps.mean() < 0.6
  same = loadgen.request_set(5, 2.0, 2, 4, seed=1)
  assert (same["arrival"] > 0).sum() == 4
  for key in ("max_tokens", "prompt", "image_choice"):  # The same requests at every rate.
    assert list(same[key]) == list(at_once[key])


def test_static_run_and_costs_on_the_tiny_model(converted_checkpoint, tmp_path):
  """The static run answers every request, counting at most each one's max_tokens, in the
  batches its arrivals allow; the measured costs are the engine's programs at `slots` rows."""
  model = loading.load_model(converted_checkpoint(1)[0])
  requests = loadgen.request_set(5, 0.0, 3, 3, seed=0)
  requests["max_tokens"][1] = 2
  requests["arrival"] = np.array([0.0, 0.0, 0.0, 1e6, 1e6])  # Two waves, far apart.
  path = tmp_path / "image.png"
  path.write_bytes(loadgen.make_images(1, 32, seed=0)[0])
  static = loadgen.run_static(model, requests, [str(path)], lambda i: 0, 2, loadgen._Compiles())
  assert static["batches"] == 3 and static["output_tokens"] == 3 + 2 + 3 + 3 + 3
  assert static["seconds"] > 1e6  # The idle wait for the second wave is counted.
  costs = loadgen.measure_costs(model, 2, 2, 8, model.config.vision.image_size, repeats=1)
  assert costs["chunk_s"] > 0 and costs["step_s"] == costs["chunk_s"] / 2 and costs["tower_s"] > 0
  assert set(costs["prefill_s"]) == set(costs["prompt_length"].values())
  assert all(v > 0 for v in costs["prefill_s"].values())

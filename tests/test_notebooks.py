"""Runs colab/*.ipynb end to end on CPU with a tiny random model (PALIGEMMA_NOTEBOOK_SMOKE_TEST=1)."""

import importlib.util
import os

import nbclient
import nbformat
import pytest
from helpers import ROOT

COLAB = os.path.join(ROOT, "colab")


def run_notebook(name, monkeypatch):
  """Executes the notebook in a fresh kernel (which inherits this environment); returns the
  text it printed and the number of images it displayed."""
  monkeypatch.setenv("PALIGEMMA_NOTEBOOK_SMOKE_TEST", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "saved with outputs"
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": COLAB}}).execute()  # Raises on an error.
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  images = sum("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
  return text, images


def test_inference_notebook(monkeypatch):
  text, images = run_notebook("inference.ipynb", monkeypatch)
  assert "tiny-pg2 at 16px, float32" in text
  assert "'caption en'" in text and "'detect car'" in text and "(length, 32 tokens)" in text
  assert "<loc0460><loc0205><loc0818><loc0767> car" in text  # The known-box encoding.
  assert images == 3  # The image, the model's boxes, the known boxes.


@pytest.mark.skipif(importlib.util.find_spec("paligemma_jax.training.objective") is None,
                    reason="the fine-tuning module is not there")
def test_finetune_notebook(monkeypatch):
  text, images = run_notebook("finetune.ipynb", monkeypatch)
  before = float(text.split("held-out loss before: ")[1].split()[0])
  after = float(text.split("held-out loss after: ")[1].split()[0])
  assert after < before  # Three steps on the training data lower the held-out loss too.
  assert "step    3  loss" in text and "mAP@0.5 on 4 held-out images" in text
  assert images == 1
  assert "['config.json', 'params', 'tokenizer.model']" in text.split("mAP@0.5")[1]  # Exported.

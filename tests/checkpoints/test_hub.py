"""Hub ids (`ORG/NAME[@REVISION]`): resolved through a real huggingface_hub cache, offline.

The cache is built as huggingface_hub lays it out (models--ORG--NAME/{refs,snapshots,blobs}) in a
temporary HF_HOME, and HF_HUB_OFFLINE=1 keeps every test off the network. The failures a user
meets online (gated, missing repo or revision) are the real exception classes, raised by a
stand-in for snapshot_download.
"""

import hashlib
import os

import httpx2
import huggingface_hub
import jax
from huggingface_hub import errors as hub_errors
import numpy as np
import pytest

import hf_fixtures
from checkpoints_convert import hf_to_orbax
from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax.checkpoints import hf
from paligemma_jax.checkpoints import hub
from paligemma_jax.checkpoints import loading

REPO_ID = "tiny-org/paligemma-tiny"


def add_to_cache(hub_cache, repo_id, source_dir, commit, ref=None):
  """Puts every file of `source_dir` into the cache as snapshot `commit`, files as symlinks to
  blobs named by their sha256, and points `ref` (if given) at it."""
  root = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
  snapshot = os.path.join(root, "snapshots", commit)
  os.makedirs(snapshot)
  os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
  for name in sorted(os.listdir(source_dir)):
    with open(os.path.join(source_dir, name), "rb") as f:
      data = f.read()
    blob = hashlib.sha256(data).hexdigest()
    with open(os.path.join(root, "blobs", blob), "wb") as f:
      f.write(data)
    os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
  if ref:
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", ref), "w") as f:
      f.write(commit)  # No newline, as huggingface_hub writes it.
  return snapshot


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, spm_model_path):
  """Two tiny PaliGemma 2 directories with different weights: what main and v2 point at."""
  root = tmp_path_factory.mktemp("hub_sources")
  return [hf_fixtures.make_hf_paligemma(str(root / f"seed{seed}"), version=2, seed=seed,
                                        tokenizer_model=spm_model_path).path for seed in (0, 1)]


@pytest.fixture
def hf_home(tmp_path, monkeypatch, hf_dirs):
  """An offline HF_HOME whose cache holds REPO_ID: main -> commit a..., v2 -> commit b..."""
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  add_to_cache(str(home / "hub"), REPO_ID, hf_dirs[0], "a" * 40, ref="main")
  add_to_cache(str(home / "hub"), REPO_ID, hf_dirs[1], "b" * 40, ref="v2")
  return home


def _same_params(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  return tree_a == tree_b and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def test_parse():
  assert hub.parse("google/paligemma2-3b-pt-224") == ("google/paligemma2-3b-pt-224", None)
  assert hub.parse("google/paligemma2-3b-pt-224@refs/pr/1") == ("google/paligemma2-3b-pt-224",
                                                                 "refs/pr/1")
  for local in ("/ckpt/pg2", "./org/name", "pg2-3b", "a/b/c", "../x", "~/x", "org/..", "org/"):
    assert hub.parse(local) is None, local


@pytest.mark.parametrize("revision", ["../../x", "..", "v2/../main", ".hidden", "a/.b", "x.lock",
                                      "a//b", "/etc", "main/", "v2.", "@", "a@{1}", "a b", "v2~1",
                                      "v2^", "a:b", "a\\b", "a\nb", ""])
def test_a_revision_must_be_a_git_ref_name(hf_home, monkeypatch, revision):
  """`ORG/NAME@../../x` was looked up as the cache's refs/../../x: outside the cache."""
  monkeypatch.setattr(huggingface_hub, "snapshot_download",
                      lambda *a, **k: pytest.fail("looked up"))
  name = f"{REPO_ID}@{revision}"
  with pytest.raises(errors.InputError, match="no revision of a Hub id") as e:
    loading.checkpoint_kind(name)
  assert cli.one_line(e.value).startswith(cli.one_line(name + ": no such local path"))
  for good in ("main", "v2", "refs/pr/1", "b" * 40, "release-1.0", "feature/x@y", "ünï"):
    assert hub.parse(f"{REPO_ID}@{good}") == (REPO_ID, good)


def test_an_existing_local_path_wins(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("org/name")
  assert hub.resolve("org/name") == "org/name"
  # Callers pass pathlib paths too (the fine-tuning base); they come back as strings.
  assert hub.resolve(tmp_path / "org/name") == str(tmp_path / "org/name")


def test_load_by_id_and_revision(hf_home, hf_dirs):
  snapshot = hf_home / "hub" / ("models--" + REPO_ID.replace("/", "--")) / "snapshots"
  assert hub.resolve(REPO_ID) == str(snapshot / ("a" * 40))
  assert hub.resolve(REPO_ID + "@v2") == str(snapshot / ("b" * 40))
  assert hub.resolve(REPO_ID + "@" + "b" * 40) == str(snapshot / ("b" * 40))  # A commit hash.
  main, v2 = (hf.load_hf(d)[0] for d in hf_dirs)
  model = loading.load_model(REPO_ID, dtype="float32")
  assert _same_params(model.params, main) and not _same_params(model.params, v2)
  assert model.tokenizer.path.startswith(str(snapshot))
  assert _same_params(loading.load_model(REPO_ID + "@v2", dtype="float32").params, v2)
  assert loading.checkpoint_kind(REPO_ID) == "hf"
  identity = loading.checkpoint_identity(REPO_ID + "@v2")
  assert identity["checkpoint"] == os.path.realpath(snapshot / ("b" * 40))
  assert identity != loading.checkpoint_identity(REPO_ID)


def test_converter_takes_an_id(hf_home, tmp_path, spm_model_path):
  out = str(tmp_path / "converted")
  hf_to_orbax.convert(REPO_ID + "@v2", out, progress=False)
  assert sorted(os.listdir(out)) == ["config.json", "params", "tokenizer.model"]


@pytest.mark.parametrize("name, words", [
    ("tiny-org/not-cached", ["HF_HUB_OFFLINE", "not in the Hugging Face cache"]),
    (REPO_ID + "@no-such-branch", ["HF_HUB_OFFLINE", "not in the Hugging Face cache"]),
])
def test_offline_with_nothing_cached(hf_home, name, words):
  with pytest.raises(errors.InputError) as e:
    loading.load_model(name)
  assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), e.value
  assert str(hf_home) in str(e.value)  # Names the cache that was searched.


def _http_error(cls, status, message="refused"):
  request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO_ID}")
  return cls(message, response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("error, token, words", [
    (_http_error(hub_errors.GatedRepoError, 403), None,
     ["gated", f"https://huggingface.co/{REPO_ID}", "hf auth login", "HF_TOKEN"]),
    (_http_error(hub_errors.GatedRepoError, 403), "hf_x",
     ["gated", "token", f"https://huggingface.co/{REPO_ID}"]),
    (_http_error(hub_errors.RepositoryNotFoundError, 404), None,
     ["no such local directory", "no model", "private", "hf auth login"]),
    (_http_error(hub_errors.RevisionNotFoundError, 404), None, ["no revision 'v9'", "branch"]),
    (_http_error(hub_errors.HfHubHTTPError, 503, "Service Unavailable"), None, ["503", "later"]),
    (hub_errors.LocalEntryNotFoundError("no connection"), None,
     ["cannot reach the Hugging Face Hub", "network"]),
    (httpx2.ReadTimeout("timed out"), None, ["download", "failed", "rerun"]),
])
def test_online_errors_are_one_line(monkeypatch, tmp_path, error, token, words):
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
  calls = []

  def refuse(repo_id, **kw):
    calls.append((repo_id, kw))
    raise error

  monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
  monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
  with pytest.raises(errors.InputError) as e:
    loading.checkpoint_kind(REPO_ID + "@v9")
  message = cli.one_line(e.value)
  assert str(e.value) == message and all(w in message for w in words), message
  assert message.startswith(REPO_ID + "@v9: ")
  (repo_id, kw), = calls
  assert repo_id == REPO_ID and kw["revision"] == "v9" and not kw["local_files_only"]
  assert kw["cache_dir"] == str(tmp_path / "hub")
  assert sorted(kw["allow_patterns"]) == sorted(hub.PATTERNS)

"""Hugging Face Hub ids wherever a checkpoint is named: `google/paligemma2-3b-pt-224[@REVISION]`.

`resolve(name)` gives a local directory: `name` itself when it exists (a local path always
wins), else the Hub snapshot huggingface_hub downloads into its cache (HF_HOME, HF_HUB_CACHE),
only the files a PaliGemma load needs (`PATTERNS`), with its progress bars. HF_HUB_OFFLINE=1
uses the cache only; HF_TOKEN (or `hf auth login`) opens gated models. The environment is read
at each call, not when huggingface_hub is imported, so a program (or a test) may set it late.
Every expected failure (gated, missing repo or revision, offline with nothing cached, no
network) becomes one `errors.InputError` line saying what to do.
"""

import os
import re

from paligemma_jax import errors

# config.json, the weights (one file or shards + index) and the SentencePiece model.
PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model")
HUB = "https://huggingface.co"
LOGIN = "log in with `hf auth login` (huggingface_hub's CLI) or set HF_TOKEN"

# ORG/NAME as the Hub spells them, optionally @REVISION (a branch, tag or commit hash).
_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>.*))?",
                 re.DOTALL)
# What no git ref name holds (git check-ref-format): control characters, space, ~ ^ : ? * [ \,
# "..", "@{", "//".
_NOT_IN_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
_resolved = {}  # (name, cache dir, offline) -> snapshot directory: one look-up per process.


def parse(name: str) -> tuple[str, str | None] | None:
  """(repo id, revision or None) if `name` is no local path and reads as a Hub id, else None.
  A revision that is no git ref name is an InputError (`_check_revision`)."""
  if os.path.exists(name):
    return None
  match = _ID.fullmatch(name)
  if match is None or ".." in match["repo"] or match["repo"].endswith((".", "-")):
    return None
  if match["revision"] is not None:
    _check_revision(name, match["revision"])
  return match["repo"], match["revision"]


def _check_revision(name: str, revision: str):
  """Accepts what a git branch or tag can be called (git check-ref-format's rules, one level
  allowed) and so a commit hash: the Hub names nothing else, and huggingface_hub's cache keeps a
  ref as a file under refs/, so `..`, a leading `/` or a `.` part would lead outside the cache."""
  parts = revision.split("/")
  if (revision in ("", "@") or _NOT_IN_REF.search(revision) or revision.endswith(".")
      or any(not part or part.startswith(".") or part.endswith(".lock") for part in parts)):
    raise errors.InputError(
        f"{name}: no such local path, and {revision!r} is no revision of a Hub id "
        "ORG/NAME@REVISION: a branch, tag or commit hash, as git names them (no '..', '//' or "
        "'@{', no space, control character or any of ~^:?*[\\, no part starting with '.' or "
        "ending with '.lock', no '/' or '.' at the end).")


def is_hub_id(name: str) -> bool:
  return parse(name) is not None


def _is_true(value: str | None) -> bool:
  return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
  """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub reads it, but now."""
  return _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> str:
  """huggingface_hub's cache directory, from the environment as it is now."""
  env = os.environ
  home = env.get("HF_HOME") or os.path.join(
      env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
  path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
  return os.path.expandvars(os.path.expanduser(path))


def resolve(name: str | os.PathLike) -> str:
  """A local directory for `name`: itself if it is not a Hub id, else the cached snapshot."""
  name = os.fspath(name)
  parsed = parse(name)
  if parsed is None:
    return name
  key = (name, cache_dir(), offline())
  if key not in _resolved:
    _resolved[key] = download(*parsed)
  return _resolved[key]


def download(repo: str, revision: str | None = None) -> str:
  """The snapshot directory of `repo` at `revision` (default: main) with the files of PATTERNS,
  downloaded if needed; InputError for every failure a user can fix."""
  import huggingface_hub  # Imported late: only Hub ids need it.
  from huggingface_hub import errors as hub_errors
  import httpx2  # huggingface_hub's HTTP client.

  where = f"{repo}@{revision}" if revision else repo
  page = f"{HUB}/{repo}"
  cache, is_offline = cache_dir(), offline()
  try:
    return huggingface_hub.snapshot_download(
        repo, revision=revision, cache_dir=cache, local_files_only=is_offline,
        allow_patterns=list(PATTERNS))
  except hub_errors.GatedRepoError:
    if huggingface_hub.get_token():
      why = (f"a gated model that your Hugging Face token may not open: accept its licence on "
             f"{page} with that account (or use another token, HF_TOKEN)")
    else:
      why = f"a gated model: accept its licence on {page}, then {LOGIN}"
    raise errors.InputError(f"{where}: {why}.") from None
  except hub_errors.RepositoryNotFoundError:
    raise errors.InputError(
        f"{where}: no such local directory, and no model {repo} on the Hugging Face Hub (if it "
        f"is private, {LOGIN}).") from None
  except hub_errors.RevisionNotFoundError:
    raise errors.InputError(f"{where}: {repo} has no revision {revision!r} on the Hugging Face "
                            f"Hub (a branch, tag or commit hash; see {page}/tree/main).") from None
  except hub_errors.IncompleteSnapshotError:
    raise errors.InputError(
        f"{where}: the cached copy in {cache} is incomplete and the Hub cannot be reached; "
        "rerun with network access to complete it.") from None
  except hub_errors.LocalEntryNotFoundError:
    if is_offline:
      raise errors.InputError(
          f"{where}: no such local directory, and not in the Hugging Face cache {cache} "
          "(HF_HUB_OFFLINE is set): run once with network access (HF_HUB_OFFLINE unset) to "
          "download it, or give a local directory.") from None
    raise errors.InputError(
        f"{where}: cannot reach the Hugging Face Hub and it is not in the cache {cache}: check "
        "the network connection (or a proxy, HF_ENDPOINT), or give a local directory.") from None
  except hub_errors.HFValidationError as e:
    raise errors.InputError(f"{where}: not a valid Hugging Face Hub id ({e}).") from None
  except hub_errors.HfHubHTTPError as e:  # 5xx, 401/403 on a file, ...
    status = getattr(e.response, "status_code", "?")
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise errors.InputError(f"{where}: the Hugging Face Hub answered {status} ({first}); try "
                            "again later or give a local directory.") from None
  except (httpx2.TransportError, ConnectionError, TimeoutError) as e:  # Lost mid-download.
    raise errors.InputError(f"{where}: the download from the Hugging Face Hub failed "
                            f"({type(e).__name__}: {e}); rerun to resume it.") from None

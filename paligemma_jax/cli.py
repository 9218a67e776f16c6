"""What every command-line entry point shares: flags defined only when run, one error path.

  if __name__ == "__main__":
    cli.run(main, define_flags)

Flags are defined by `define_flags` only when a module runs as a program, so any set of modules
can be imported together. An expected failure (`errors.InputError`, an `OSError` such as a
missing file, a `UsageError`) ends the program with one line, `PROGRAM: error: MESSAGE`, and exit
status 1; anything else is a bug and keeps its traceback.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import logging as std_logging
from ml_collections import config_flags

from paligemma_jax import compilation_cache
from paligemma_jax import errors
from paligemma_jax import multihost
from paligemma_jax import sharding
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import core

EXPECTED = (errors.InputError, OSError, app.UsageError)
# Static bounds of integer flags, checked as they are parsed: absl takes integers of any size, and
# past these a run would fail deep inside (an int32 on the device, a batch no memory holds).
MAX_BATCH_SIZE = 1 << 16
MAX_BEAM_SIZE = 256  # Captioning uses 2-5; each beam is a row of KV cache per example.


def one_line(error: BaseException | str) -> str:
  """The message of `error` on one line (an OSError's names the file)."""
  return " ".join(str(error).split()) or type(error).__name__


def report(error: BaseException | str):
  """`PROGRAM: error: MESSAGE` on stderr; PROGRAM is the entry point's file, e.g. generate.py."""
  program = os.path.basename(sys.argv[0])
  if program in ("", "__main__.py", "-m", "-c"):
    program = "paligemma_jax"
  print(f"{program}: error: {one_line(error)}", file=sys.stderr, flush=True)


def run(main, define_flags=None):
  """Defines the flags, parses them and calls `main(argv)`; expected errors become one line."""
  if define_flags is not None:
    define_flags()
  if "compilation_cache" not in flags.FLAGS:  # Every program has it.
    flags.DEFINE_string("compilation_cache", compilation_cache.default_dir(),
                        "Folder of the persistent XLA compilation cache (a second run compiles "
                        "nothing); empty turns it off. Default: $JAX_COMPILATION_CACHE_DIR or "
                        "$XDG_CACHE_HOME/paligemma_jax/xla.")

  def reporting_main(argv):
    # Undecodable input (a lone surrogate from argv bytes) is echoed as an escape, not a crash.
    for stream in (sys.stdout, sys.stderr):
      if hasattr(stream, "reconfigure"):  # Not when a caller replaced the stream.
        stream.reconfigure(errors="backslashreplace")
    try:
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (flags are written --name=value)")
      checkpoint.quiet_orbax_logs()
      # JAX names each accelerator plugin it could not open (libtpu on a CPU host) at INFO.
      std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
      compilation_cache.enable(flags.FLAGS.compilation_cache)
      return main(argv)
    except EXPECTED as e:
      report(e)
      return 1

  app.run(reporting_main, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's parsing, but a bad flag value is one line: absl prints a config file's whole
  traceback (ml_collections' config_flags) and a pointer to --helpshort."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # "flag --x=y: ..." + a traceback.
      flag = lines[0].split(": ", 1)[0]
      lines = [f"{flag}: {lines[-1].split(': ', 1)[-1]}"]
    report(" ".join(lines))
    sys.exit(1)


def define_model_flags():
  """--checkpoint, --config, --dtype, --batch_size, --quantize, --kv_cache_dtype, --mesh,
  --distributed: how to load and run a model, shared by generate, evaluate and serve."""
  main = _listed_with_the_program()
  flags.DEFINE_string("checkpoint", None, "A converted checkpoint "
                      "(checkpoints_convert.hf_to_orbax), a Hugging Face PaliGemma directory, or "
                      "a Hub id ORG/NAME[@REVISION] (e.g. google/paligemma2-3b-pt-224).",
                      required=True, **main)
  config_flags.DEFINE_config_file(
      "config", None, "Optional model config overriding the checkpoint's, e.g. "
      "configs/paligemma.py:pg2-3b-448 --config.text.sliding_window=0. Shapes must match.",
      lock_config=False)
  flags.FLAGS.register_flag_by_module(main["module_name"], flags.FLAGS["config"])
  flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                    "Compute and parameter dtype; auto = float32 on CPU, bfloat16 on TPU/GPU.",
                    **main)
  flags.DEFINE_integer("batch_size", 1, "Examples per compiled batch (the last is padded).",
                       lower_bound=1, upper_bound=MAX_BATCH_SIZE, **main)
  flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Compute with int8 or int4 weights (a "
                    "float checkpoint is quantized as it loads); default: as stored (a checkpoint "
                    "converted with --quantize=int8 is int8).", **main)
  flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"], "The KV cache's keys and values: "
                    "auto = the compute dtype (--dtype); int8 = int8 with a scale per token and kv "
                    "head, about half the bytes of bfloat16 (a quarter of float32): more rows or "
                    "longer prompts in the same memory.", **main)
  define_mesh_flags()


def define_beam_flags():
  """--beam_size and --length_penalty, for --sampler=beam (decoding/settings.py reads them).
  The model's vocabulary bounds the beams too (2 * beam_size ids): checked once it is loaded."""
  main = _listed_with_the_program()
  flags.DEFINE_integer("beam_size", None, f"Beams per example, for --sampler=beam (1 to "
                       f"{MAX_BEAM_SIZE}).", lower_bound=1, upper_bound=MAX_BEAM_SIZE, **main)
  flags.DEFINE_float("length_penalty", None, "For --sampler=beam: a hypothesis scores "
                     "sum(log-probs) / length ** A (default 1, as transformers; 0: big_vision's "
                     "sum).", **main)


def _listed_with_the_program() -> dict:
  """Flags defined here are listed by --help with the entry point's own flags."""
  return dict(module_name=sys.argv[0])


def define_mesh_flags():
  """`--mesh` and `--distributed`, shared by the command-line entry points."""
  main = _listed_with_the_program()
  flags.DEFINE_string("mesh", None, "Shard the model, batch and KV cache over the devices, e.g. "
                      "'fsdp:-1', 'data:2,fsdp:4', 'fsdp:4,tensor:2' (axes data, fsdp, tensor; "
                      "-1 = the rest; see docs/scaling.md). Default: one device.", **main)
  flags.DEFINE_bool("distributed", None, "Join a multi-host job (jax.distributed.initialize); "
                    "default: $PALIGEMMA_DISTRIBUTED.", **main)


def mesh_from_flags():
  """Joins the multi-host job if asked, then builds --mesh (None: one device). Call it first.

  On a multi-host job only the writing process logs below ERROR: every host runs the same steps
  and reads the same data, so the others would repeat each line (and each bad-line warning).
  """
  multihost.initialize_distributed(flags.FLAGS.distributed)
  if not multihost.is_writer():
    logging.set_verbosity(logging.ERROR)
  if not flags.FLAGS.mesh:
    return None
  try:
    return sharding.mesh_from_string(flags.FLAGS.mesh)
  except ValueError as e:
    raise errors.InputError(f"--mesh: {e}") from None


def model_settings() -> dict:
  """What names the model and how it runs, recorded beside results: the checkpoint's identity
  (without loading it), the dtype, any --config override, --quantize and --kv_cache_dtype."""
  f = flags.FLAGS
  override = None if f.config is None else f.config.to_dict()
  # Only when given, so older runs' settings still match.
  quantized = {"quantize": f.quantize} if f.quantize else {}
  int8_cache = {"kv_cache_dtype": f.kv_cache_dtype} if kv_cache_dtype_from_flags() else {}
  return {**loading.checkpoint_identity(f.checkpoint), "dtype": dtype_from_flags(),
          "config": override, **quantized, **int8_cache}


def dtype_from_flags() -> str:
  return loading.default_dtype() if flags.FLAGS.dtype == "auto" else flags.FLAGS.dtype


def kv_cache_dtype_from_flags() -> str | None:
  """The `cache_dtype` of Predictor, Scorer and Engine: None (the compute dtype) or "int8"."""
  return None if flags.FLAGS.kv_cache_dtype == "auto" else flags.FLAGS.kv_cache_dtype


def load_model_from_flags(mesh):
  """The model, in the layout the decoding commands' Generator uses (no second copy of it)."""
  f = flags.FLAGS
  return loading.load_model(f.checkpoint, dtype=dtype_from_flags(), mesh=mesh, config=f.config,
                            quantize=f.quantize, scan_layers=core.default_scan_layers())

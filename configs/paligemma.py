"""PaliGemma model configs: variant x resolution, as ml_collections ConfigDicts.

Use from the command line as `--config=configs/paligemma.py:pg2-3b-448`, or in Python
as `get_config("pg2-3b-448")`. The argument is `VARIANT[-RESOLUTION]`:

  VARIANT     model                                      text (Gemma) width x layers
  pg1-3b      paligemma-3b  (SigLIP So400m + Gemma 2B)    2048 x 18, MQA
  pg2-3b      paligemma2-3b (SigLIP So400m + Gemma 2 2B)  2304 x 26
  pg2-10b     paligemma2-10b (+ Gemma 2 9B)               3584 x 42
  pg2-28b     paligemma2-28b (+ Gemma 2 27B)              4608 x 46
  tiny-pg1    a few-kilobyte PaliGemma 1 for tests
  tiny-pg2    a few-kilobyte PaliGemma 2 for tests (softcaps, post-norms, sliding window)

  RESOLUTION  224 | 448 | 896 (image tokens 256 | 1024 | 4096); default 224.

Numeric dtypes: `param_dtype` is how weights are stored, `dtype` is the compute dtype. Use
float32 on CPU and bfloat16 on TPU/GPU.
"""

import ml_collections

_SO400M = dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, norm_eps=1e-6)

_GEMMA_DEFAULTS = dict(
    family="gemma",  # "gemma" (PaliGemma 1) or "gemma2" (PaliGemma 2).
    vocab_size=257216,  # Embedding rows: 257152 tokens padded to a multiple of 64.
    width=2048,
    depth=18,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
    query_pre_attn_scalar=256.0,  # Queries are scaled by this ** -0.5.
    attn_logit_softcap=0.0,  # 0 disables; Gemma 2: tanh(s / 50) * 50.
    final_logit_softcap=0.0,  # 0 disables; Gemma 2: tanh(l / 30) * 30.
    sliding_window=0,  # 0 disables; Gemma 2 checkpoints use 4096.
    layer_types=(),  # Per layer "sliding_attention" | "full_attention"; () = the family default.
    norm_eps=1e-6,
    rope_base=10000.0,
)

TEXT_VARIANTS = {
    "pg1-3b": dict(),
    "pg2-3b": dict(family="gemma2", width=2304, depth=26, num_heads=8, num_kv_heads=4, mlp_dim=9216,
                   attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096),
    "pg2-10b": dict(family="gemma2", width=3584, depth=42, num_heads=16, num_kv_heads=8, mlp_dim=14336,
                    attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096),
    "pg2-28b": dict(family="gemma2", width=4608, depth=46, num_heads=32, num_kv_heads=16, head_dim=128,
                    mlp_dim=36864, query_pre_attn_scalar=144.0, attn_logit_softcap=50.0,
                    final_logit_softcap=30.0, sliding_window=4096),
    "tiny-pg1": dict(vocab_size=1600, width=64, depth=2, num_heads=4, num_kv_heads=1, head_dim=16,
                     mlp_dim=128, query_pre_attn_scalar=16.0),
    "tiny-pg2": dict(family="gemma2", vocab_size=1600, width=64, depth=3, num_heads=4, num_kv_heads=2,
                     head_dim=16, mlp_dim=128, query_pre_attn_scalar=24.0, attn_logit_softcap=50.0,
                     final_logit_softcap=30.0, sliding_window=8),
}

_TINY_VISION = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4, norm_eps=1e-6)
_TINY_RESOLUTIONS = {224: 16, 448: 32, 896: 64}  # Tiny models keep the 1:2:4 ratio at small sizes.
RESOLUTIONS = (224, 448, 896)


def get_config(arg: str = "pg2-3b-224") -> ml_collections.ConfigDict:
  """Returns the model config for `VARIANT[-RESOLUTION]` (see the module docstring)."""
  variant, _, res = arg.rpartition("-") if arg.rsplit("-", 1)[-1].isdigit() else (arg, "", "224")
  if variant not in TEXT_VARIANTS:
    raise ValueError(f"Unknown PaliGemma variant {variant!r}; choose one of {sorted(TEXT_VARIANTS)}.")
  resolution = int(res)
  if resolution not in RESOLUTIONS:
    raise ValueError(f"Unknown resolution {resolution}; choose one of {RESOLUTIONS}.")
  tiny = variant.startswith("tiny")
  vision = dict(_TINY_VISION if tiny else _SO400M)
  vision["image_size"] = _TINY_RESOLUTIONS[resolution] if tiny else resolution
  cfg = ml_collections.ConfigDict()
  cfg.variant = variant
  cfg.vision = ml_collections.ConfigDict(vision)
  cfg.text = ml_collections.ConfigDict({**_GEMMA_DEFAULTS, **TEXT_VARIANTS[variant]})
  # The image token follows the base vocabulary and the 1024 + 128 loc/seg tokens.
  cfg.image_token_id = cfg.text.vocab_size - 64  # Real: 257152; tiny: 1536.
  cfg.dtype = "float32"  # Compute dtype: "bfloat16" on TPU/GPU.
  cfg.param_dtype = "float32"
  cfg.remat = False  # Rematerialise layer activations in the backward pass (fine-tuning).
  cfg.scan_layers = True  # Stacked decoder weights under nn.scan (decoding unstacks them).
  return cfg

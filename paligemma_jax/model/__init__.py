"""The networks: SigLIP, Gemma, PaliGemma, their masks, KV cache and int8 layers."""

"""Where each model's weights live, relative to ``MODELS_DIR`` (docs/APP_CONTRACT.md §7).

The model configs (``model_repository/*/config.pbtxt`` parameters) name the same paths; the tiny
model builder writes them, the start-up checks look for them. A test keeps the two in step.
"""

SDXL_CHECKPOINT = "sdxl-lustify/lustifySDXLNSFWSFW_v20.safetensors"
# The single-file checkpoint loads offline only with a local SDXL base config folder
# (model_index.json, */config.json, tokenizer files of stabilityai/stable-diffusion-xl-base-1.0).
SDXL_CONFIG = "sdxl-base-config"
WAN_DIFFUSERS = "wan2.1-t2v-1.3b-diffusers"
WAN_ORIGINAL = "wan2.1-t2v-1.3b"  # the original Wan release layout; diffusers cannot read it
QWEN_INSTRUCT = "huggingface_cache/models--Qwen--Qwen2.5-7B-Instruct"
QWEN_BASE = "huggingface_cache/models--Qwen--Qwen2.5-7B"

WEIGHTS = {
    "sdxl": {"weights": SDXL_CHECKPOINT, "config": SDXL_CONFIG},
    "wan": {"weights": WAN_DIFFUSERS},
    "qwen_instruct": {"weights": QWEN_INSTRUCT},
    "qwen_base": {"weights": QWEN_BASE},
}

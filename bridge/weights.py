"""The weights on the volume: what is there, what is missing, and getting the rest.

- :func:`inspect_weights` says per model which layout was found where, its size and exactly which
  files are missing, with the command that fixes it (``python -m bridge weights``, ``doctor``, the
  start-up log, ``/health``'s ``missing_models``).
- :func:`servable_queues`: a queue is consumed only when the model its job types run on is
  present (``wan_queue``: ``wan``; ``chat_queue``: ``qwen_instruct``), so the jobs of the other
  queues stay in Redis for another pod, or for this one once the weights arrive
  (``bridge.availability``). An enhanced WAN job also uses ``qwen_base``; without it, it runs on
  its original prompt, the fallback its enhancement already has when the model fails.
- :func:`convert_wan`: the original Wan 2.1 release layout (``diffusion_pytorch_model*.safetensors``,
  ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/`` tokenizer) into
  the diffusers layout next to it. The transformer and VAE go through diffusers' own single-file
  loaders (``from_single_file``: its key mapping, not ours). The UMT5 encoder ``.pth`` is in the
  original code's own module naming, for which neither transformers nor diffusers keeps a
  converter (diffusers' own conversion script downloads the encoder too), so it is taken from an
  HF-layout folder (``--text-encoder``) or downloaded: only ``text_encoder/`` of the diffusers
  release. The original is only read.
- :func:`download`: the diffusers / HF layouts from the hub (``huggingface_hub``), with the
  offline switch lifted for this call only; for SDXL the base config folder (the checkpoint itself
  is the operator's own file).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bridge.jobs import JOB_TYPES
from bridge.settings import MODEL_NAMES, Settings
from model_kit import layout

log = logging.getLogger(__name__)

_GIB = float(1 << 30)
WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
QWEN_REPOS = {"qwen_instruct": "Qwen/Qwen2.5-7B-Instruct", "qwen_base": "Qwen/Qwen2.5-7B"}
#: Free disk :func:`convert_wan` wants beyond the files it writes (float32 copies are written
#: through a temporary folder, renamed into place at the end).
CONVERT_HEADROOM_BYTES = 1 << 30
#: What downloading ``text_encoder/`` of the diffusers release takes (UMT5-XXL encoder, about 11 GB).
TEXT_ENCODER_DOWNLOAD_BYTES = 12 << 30

# Parts of a diffusers folder: (sub-path or glob, what it is). A glob needs one match.
_WAN_PARTS = (
    ("model_index.json", "pipeline index"),
    ("transformer/config.json", "transformer config"),
    ("transformer/diffusion_pytorch_model*.safetensors", "transformer weights"),
    ("vae/config.json", "VAE config"),
    ("vae/diffusion_pytorch_model*.safetensors", "VAE weights"),
    ("text_encoder/config.json", "UMT5 text encoder config"),
    ("text_encoder/model*.safetensors", "UMT5 text encoder weights"),
    ("tokenizer/tokenizer_config.json", "tokenizer"),
    ("scheduler/scheduler_config.json", "scheduler config"),
)
_SDXL_CONFIG_PARTS = (
    ("model_index.json", "pipeline index"),
    ("unet/config.json", "UNet config"),
    ("vae/config.json", "VAE config"),
    ("text_encoder/config.json", "text encoder config"),
    ("text_encoder_2/config.json", "text encoder 2 config"),
    ("tokenizer/tokenizer_config.json", "tokenizer"),
    ("tokenizer_2/tokenizer_config.json", "tokenizer 2"),
    ("scheduler/scheduler_config.json", "scheduler config"),
)


class WeightsError(RuntimeError):
    """A weights command cannot do what it was asked; the message says why and what to do."""


@dataclass(frozen=True)
class ModelWeights:
    """What :func:`inspect_weights` found for one model."""

    model: str
    present: bool
    layout: str  # "diffusers", "single-file + base config", "hf", "original Wan release", "none"
    path: Path
    size_bytes: int = 0
    missing: tuple[str, ...] = ()
    fix: str = ""

    def summary(self) -> str:
        """One line for logs and ``/health``: where it looked, what is missing, what to do."""
        if self.present:
            return f"{self.model}: {self.layout} at {self.path} ({self.size_bytes / _GIB:.1f} GiB)"
        return f"{self.model}: missing {'; '.join(self.missing)} (looked in {self.path}). {self.fix}"

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "layout": self.layout, "path": str(self.path),
                "missing": list(self.missing), "fix": self.fix}


@dataclass
class _Found:
    missing: list[str] = field(default_factory=list)
    size: int = 0


def _parts(folder: Path, parts: Iterable[tuple[str, str]]) -> _Found:
    found = _Found()
    if not folder.is_dir():
        found.missing.append("the whole folder (nothing there)")
        return found
    for pattern, what in parts:
        matches = [p for p in folder.glob(pattern) if p.is_file()]
        if not matches:
            found.missing.append(f"{what} ({pattern})")
        found.size += sum(p.stat().st_size for p in matches)
    return found


def _cmd(action: str, model: str) -> str:
    return f"python -m bridge weights {action} {model}"


def _inspect_sdxl(settings: Settings, env: Mapping[str, str]) -> ModelWeights:
    checkpoint = settings.weights_path("sdxl", "weights", env)
    config = settings.weights_path("sdxl", "config", env)
    missing: list[str] = []
    size = 0
    if checkpoint.is_file() and checkpoint.stat().st_size > 0:
        size = checkpoint.stat().st_size
    elif (checkpoint / "model_index.json").is_file():  # a diffusers folder instead of one file
        size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        return ModelWeights("sdxl", True, "diffusers", checkpoint, size)
    else:
        missing.append(f"checkpoint {checkpoint} (set SDXL_WEIGHTS to where it is)")
    parts = _parts(config, _SDXL_CONFIG_PARTS)
    missing += [f"base config {m} in {config}" for m in parts.missing]
    fix = ""
    if parts.missing:
        fix = f"Run `{_cmd('download', 'sdxl')}` (fetches the base config, a few MB)."
    if not size:
        fix += " The checkpoint is the operator's own file: copy it to the volume."
    return ModelWeights("sdxl", not missing, "single-file + base config", checkpoint, size + parts.size,
                        tuple(missing), fix.strip())


def _inspect_wan(settings: Settings, env: Mapping[str, str]) -> ModelWeights:
    folder = settings.weights_path("wan", "weights", env)
    parts = _parts(folder, _WAN_PARTS)
    if not parts.missing:
        return ModelWeights("wan", True, "diffusers", folder, parts.size)
    original = settings.models_dir / layout.WAN_ORIGINAL
    if original_wan_files(original):
        fix = (f"The original Wan release layout is at {original}: run `{_cmd('convert', 'wan')}` "
               f"(or `{_cmd('download', 'wan')}`).")
        found = "original Wan release"
    else:
        fix = f"Run `{_cmd('download', 'wan')}` (or set WAN_WEIGHTS to where it is)."
        found = "partial diffusers" if parts.size else "none"
    return ModelWeights("wan", False, found, folder, parts.size, tuple(parts.missing), fix)


def _inspect_qwen(settings: Settings, env: Mapping[str, str], model: str) -> ModelWeights:
    from model_kit.common import resolve_hf_folder  # noqa: PLC0415 - the resolution the model uses

    path = settings.weights_path(model, "weights", env)
    fix = f"Run `{_cmd('download', model)}` (or set {model.upper()}_WEIGHTS to where it is)."
    try:
        folder = resolve_hf_folder(path)
    except FileNotFoundError:
        return ModelWeights(model, False, "none", path, 0, ("config.json (there or in snapshots/<hash>/)",), fix)
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    present = [p for p in files if p.exists()]  # a dangling cache link is an unfinished download
    missing = [f"{p.name} (broken link: unfinished download?)" for p in files if not p.exists()]
    if not files:
        missing.append("weights (*.safetensors)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer (tokenizer.json)")
    size = sum(p.stat().st_size for p in present)
    return ModelWeights(model, not missing, "hf", folder, size, tuple(missing), fix if missing else "")


def inspect_weights(settings: Settings, models: Iterable[str] = MODEL_NAMES,
                    environ: Mapping[str, str] | None = None) -> dict[str, ModelWeights]:
    """Per model in ``models``: the layout found, its size, what is missing and how to get it."""
    env = os.environ if environ is None else environ
    found = {}
    for model in models:
        if model == "sdxl":
            found[model] = _inspect_sdxl(settings, env)
        elif model == "wan":
            found[model] = _inspect_wan(settings, env)
        else:
            found[model] = _inspect_qwen(settings, env, model)
    return found


def servable_queues(present: Iterable[str]) -> dict[str, list[str]]:
    """Queue → the models it cannot run without that are not ``present`` (empty: consume it).
    A queue needs the models every one of its job types uses (``wan_queue``: ``wan``;
    ``chat_queue``: ``qwen_instruct``); a model only some use (``qwen_base``, the enhancement
    of the ``*_enhanced`` WAN jobs) is optional: without it those jobs run with their original
    prompt, as when an enhancement fails (:func:`degraded_job_types`)."""
    have = set(present)
    needs: dict[str, set[str]] = {}
    for job_type in JOB_TYPES.values():
        models = set(job_type.models)
        needs[job_type.queue] = needs[job_type.queue] & models if job_type.queue in needs else models
    return {queue: sorted(models - have) for queue, models in needs.items()}


def degraded_job_types(present: Iterable[str]) -> dict[str, list[str]]:
    """Missing model → the job types of consumed queues that run without it."""
    have = set(present)
    paused = {queue for queue, lacking in servable_queues(have).items() if lacking}
    degraded: dict[str, list[str]] = {}
    for name, job_type in sorted(JOB_TYPES.items()):
        if job_type.queue not in paused:
            for model in set(job_type.models) - have:
                degraded.setdefault(model, []).append(name)
    return degraded


# ----------------------------------------------------------------------------- convert
def original_wan_files(folder: Path) -> dict[str, list[Path]]:
    """The parts of an original Wan 2.1 release folder (empty when there is none)."""
    if not folder.is_dir():
        return {}
    found = {
        "transformer": sorted(folder.glob("diffusion_pytorch_model*.safetensors")),
        "vae": [p for p in [folder / "Wan2.1_VAE.pth"] if p.is_file()],
        "text_encoder": [p for p in [folder / "models_t5_umt5-xxl-enc-bf16.pth"] if p.is_file()],
        "tokenizer": [p for p in [folder / "google" / "umt5-xxl"] if (p / "tokenizer_config.json").is_file()],
        "config": [p for p in [folder / "config.json"] if p.is_file()],
    }
    return found if any(found.values()) else {}


# Wan 2.1 T2V 1.3B as the diffusers release configures it, for when the original folder's
# config.json does not say (the original's keys: dim, ffn_dim, freq_dim, num_heads, num_layers,
# in_dim, out_dim, text_dim, eps).
_WAN_13B = {"dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "num_heads": 12, "num_layers": 30,
            "in_dim": 16, "out_dim": 16, "text_dim": 4096, "eps": 1e-6}


def _transformer_config(original: Path) -> dict[str, object]:
    """The diffusers ``WanTransformer3DModel`` config for the original folder's ``config.json``
    (hyper-parameters renamed; the weights' keys are diffusers' business)."""
    cfg = dict(_WAN_13B)
    if (original / "config.json").is_file():
        cfg.update(json.loads((original / "config.json").read_text()))
    heads = int(cfg["num_heads"])
    return {
        "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": heads,
        "attention_head_dim": int(cfg["dim"]) // heads, "in_channels": cfg["in_dim"], "out_channels": cfg["out_dim"],
        "text_dim": cfg.get("text_dim", 4096), "freq_dim": cfg["freq_dim"], "ffn_dim": cfg["ffn_dim"],
        "num_layers": cfg["num_layers"], "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": cfg["eps"], "rope_max_seq_len": cfg.get("rope_max_seq_len", 1024),
    }


def _write_configs(staging: Path, original: Path, config_dir: Path | None) -> None:
    """``transformer/``, ``vae/`` and ``scheduler/`` configs: each one ``config_dir`` (a diffusers
    folder) has is copied from it; the others are Wan 2.1's (the transformer's from the original
    folder's ``config.json``; the VAE's defaults are Wan 2.1's)."""
    from diffusers import UniPCMultistepScheduler  # noqa: PLC0415

    builtin = {
        "transformer/config.json": lambda path: path.write_text(json.dumps(_transformer_config(original), indent=2)),
        "vae/config.json": lambda path: path.write_text(json.dumps({"_class_name": "AutoencoderKLWan"})),
        # The scheduler the diffusers release ships: UniPC, flow matching, shift 3.0.
        "scheduler/scheduler_config.json": lambda path: UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
            solver_order=2).save_config(path.parent),
    }
    for name, write in builtin.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if config_dir is not None and (config_dir / name).is_file():
            shutil.copy2(config_dir / name, target)
        else:
            write(target)


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def convert_wan(settings: Settings, *, text_encoder: Path | None = None, config_dir: Path | None = None,
                target: Path | None = None, say: Callable[[str], None] = log.info) -> Path:
    """Write the diffusers layout of the original Wan release at ``MODELS_DIR/wan2.1-t2v-1.3b``
    into ``target`` (default: where the WAN model looks, ``WAN_WEIGHTS``). ``text_encoder``: an
    HF-layout UMT5 encoder folder to copy; without it only ``text_encoder/`` of the diffusers
    release is downloaded. The original is only read; the result is written in a staging folder
    and renamed into place, so a failure leaves no half folder behind."""
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: PLC0415
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint  # noqa: PLC0415

    original = settings.models_dir / layout.WAN_ORIGINAL
    target = target or settings.weights_path("wan", "weights")
    parts = original_wan_files(original)
    lacking = [name for name in ("transformer", "vae", "tokenizer") if not parts.get(name)]
    if lacking:
        raise WeightsError(f"{original} is not an original Wan 2.1 release folder: no {', '.join(lacking)} "
                           "(diffusion_pytorch_model*.safetensors, Wan2.1_VAE.pth, google/umt5-xxl/). "
                           f"Run `{_cmd('download', 'wan')}` instead.")
    if (target / "model_index.json").exists():
        raise WeightsError(f"{target} already holds a diffusers pipeline; move it away to convert again")
    # float32 diffusers copies of bf16/fp32 originals: at most twice the originals, plus headroom.
    need = 2 * sum(p.stat().st_size for name in ("transformer", "vae") for p in parts[name]) + CONVERT_HEADROOM_BYTES
    if text_encoder is None:
        need += TEXT_ENCODER_DOWNLOAD_BYTES
    else:
        need += sum(p.stat().st_size for p in text_encoder.rglob("*") if p.is_file())
    free = _free_bytes(target.parent)
    if free < need:
        raise WeightsError(f"not enough free disk at {target.parent}: {free / _GIB:.1f} GiB free, "
                           f"the conversion needs about {need / _GIB:.1f} GiB")
    staging = target.with_name(f".{target.name}.converting")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_configs(staging, original, config_dir)
        say(f"transformer: {', '.join(p.name for p in parts['transformer'])} → {staging / 'transformer'}")
        checkpoint: dict = {}
        for shard in parts["transformer"]:  # 14B-style shards merged into one state dict
            checkpoint.update(load_single_file_checkpoint(str(shard), local_files_only=True))
        WanTransformer3DModel.from_single_file(
            checkpoint, config=str(staging), subfolder="transformer", local_files_only=True, torch_dtype=torch.float32,
        ).save_pretrained(staging / "transformer", safe_serialization=True)
        del checkpoint
        say(f"vae: {parts['vae'][0].name} → {staging / 'vae'}")
        AutoencoderKLWan.from_single_file(
            str(parts["vae"][0]), config=str(staging), subfolder="vae", local_files_only=True,
            torch_dtype=torch.float32,
        ).save_pretrained(staging / "vae", safe_serialization=True)
        shutil.copytree(parts["tokenizer"][0], staging / "tokenizer")
        _text_encoder(staging, text_encoder, say)
        (staging / "model_index.json").write_text(json.dumps(_WAN_INDEX, indent=2))
        if target.exists():  # an earlier, partial folder: kept aside, not deleted
            target.rename(target.with_name(f"{target.name}.partial-{os.getpid()}"))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote the diffusers layout to {target}; {original} is unchanged")
    return target


_WAN_INDEX = {
    "_class_name": "WanPipeline",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def _text_encoder(staging: Path, source: Path | None, say: Callable[[str], None]) -> None:
    if source is not None:
        if not (source / "config.json").is_file():
            raise WeightsError(f"--text-encoder {source}: no config.json (an HF-layout UMT5EncoderModel folder)")
        say(f"text encoder: copied from {source}")
        shutil.copytree(source, staging / "text_encoder")
        return
    say(f"text encoder: the original .pth is in the Wan code's own layout, which no maintained converter "
        f"reads; downloading only text_encoder/ of {WAN_REPO} (about 11 GB)")
    _snapshot(WAN_REPO, staging, allow_patterns=["text_encoder/*"])


# ----------------------------------------------------------------------------- download
def _snapshot(repo: str, local_dir: Path | None, **kwargs: object) -> None:
    """``huggingface_hub.snapshot_download`` with the offline switch lifted for this call only
    (the image sets ``HF_HUB_OFFLINE=1``; huggingface_hub reads it into a constant at import)."""
    from huggingface_hub import constants, snapshot_download  # noqa: PLC0415

    saved = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "0"
    constants.HF_HUB_OFFLINE = False
    try:
        if local_dir is not None:
            kwargs["local_dir"] = str(local_dir)
        snapshot_download(repo, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:
        raise WeightsError(f"download of {repo} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if saved[0] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[0]
        constants.HF_HUB_OFFLINE = saved[1]


def download(settings: Settings, model: str, say: Callable[[str], None] = log.info) -> Path:
    """Fetch ``model``'s diffusers/HF layout where the model looks for it (nothing when it is
    complete there already)."""
    if model not in MODEL_NAMES:
        raise WeightsError(f"unknown model {model!r}; known: {', '.join(MODEL_NAMES)}")
    found = inspect_weights(settings, [model])[model]
    if found.present:
        say(f"{model}: already complete at {found.path}; nothing to download")
        return found.path
    if model == "sdxl":
        target = settings.weights_path("sdxl", "config")
        say(f"SDXL base config ({SDXL_BASE_REPO}, *.json and tokenizer files) → {target}")
        _snapshot(SDXL_BASE_REPO, target, allow_patterns=["*.json", "*.txt"], ignore_patterns=["*/*.fp16*"])
        return target
    if model == "wan":
        target = settings.weights_path("wan", "weights")
        say(f"{WAN_REPO} → {target}")
        _snapshot(WAN_REPO, target)
        return target
    if model in QWEN_REPOS:
        path = settings.weights_path(model, "weights")
        if path.name.startswith("models--"):  # a cache folder: download through the cache, same layout
            say(f"{QWEN_REPOS[model]} → HF cache {path.parent}")
            _snapshot(QWEN_REPOS[model], None, cache_dir=str(path.parent))
        else:
            say(f"{QWEN_REPOS[model]} → {path}")
            _snapshot(QWEN_REPOS[model], path)
        return path
    raise WeightsError(f"unknown model {model!r}; known: {', '.join(MODEL_NAMES)}")

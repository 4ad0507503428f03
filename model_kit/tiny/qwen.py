"""Tiny random-weight Qwen 2.5 models (instruct and base) in Hugging Face cache form.

Each model is written as ``<layout path>/snapshots/<hash>/`` plus ``<layout path>/refs/main`` naming
the hash, exactly like a ``models--Qwen--Qwen2.5-7B[-Instruct]`` cache folder, so loading it goes
through :func:`model_kit.common.resolve_hf_folder` as production does.

The tokenizer is a byte-level BPE trained offline on a small built-in corpus, saved with
``tokenizer_class: Qwen2Tokenizer`` (so the real Qwen tokenizer class loads it) and Qwen's chat
template; the special tokens are Qwen's (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``). The
weights are random (fixed seed): outputs are garbage text, deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from model_kit import layout

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
INSTRUCT_EOS, BASE_EOS = [IM_END, ENDOFTEXT], [ENDOFTEXT]  # as the real generation configs say
VOCAB_SIZE = 512
# Long enough that cancellation and max_tokens capping can be tested; it costs nothing here.
CONTEXT = 4096
SEED = 0
TINY_ARCHITECTURE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": CONTEXT,
    "tie_word_embeddings": True,
}

# Qwen 2.5's own template, less tool calling: a default system turn when none is given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split (the same regex its tokenizer uses).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
A cinematic wide shot of a quiet harbour at dawn, fishing boats rocking on silver water.
The camera slowly pushes in on a lighthouse while seagulls circle above the mist.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Write a detailed prompt for a video: a fox runs through a snowy forest under the northern lights.
Golden hour light spills across the rooftops of an old city; neon signs flicker on in the rain.
Numbers and symbols: 1, 2, 3, 42, 3.14, 100%, $5, #tag, @user, (brackets) [list] {set}.
Unicode text: café, naïve, über, 東京, Ελληνικά, русский, emoji 🙂🚀✨.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
"""


def _snapshot_hash(name: str) -> str:
    """A fixed 40-hex snapshot name per model (what a hub commit hash looks like)."""
    return hashlib.sha1(f"tiny-qwen-{name}-v1".encode()).hexdigest()


def train_tokenizer():
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) trained on the built-in corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    return tokenizer


def _save_tokenizer(tokenizer, folder: Path, eos_token: str) -> None:
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=CONTEXT,
    )
    wrapped.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"  # what the real checkpoints name
    config_path.write_text(json.dumps(config, indent=2))


def _save_model(folder: Path, architecture: dict, eos_ids: list[int], token_ids: dict[str, int]) -> None:
    """Random weights (seeded) for ``architecture``, made on torch's current default device and dtype."""
    import torch  # noqa: PLC0415
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: PLC0415

    config = Qwen2Config(
        **architecture,
        bos_token_id=token_ids[ENDOFTEXT],
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=token_ids[ENDOFTEXT],
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids[ENDOFTEXT], eos_token_id=eos_ids, pad_token_id=token_ids[ENDOFTEXT]
    )
    model.save_pretrained(folder)


def write_cache_folder(
    cache_root: Path, name: str, tokenizer, eos_tokens: list[str], architecture: dict | None = None
) -> Path:
    """Write one model as an HF cache folder; return its snapshot folder.

    ``architecture`` holds ``Qwen2Config`` fields (default: the tiny one); ``vocab_size`` defaults
    to the tokenizer's. ``model_kit.fullsize`` passes the real Qwen 2.5-7B one.
    """
    architecture = {"vocab_size": tokenizer.get_vocab_size(), **(architecture or TINY_ARCHITECTURE)}
    revision = _snapshot_hash(name)
    snapshot = cache_root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    token_ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    _save_tokenizer(tokenizer, snapshot, eos_token=eos_tokens[0])
    _save_model(snapshot, architecture, [token_ids[t] for t in eos_tokens], token_ids)
    (cache_root / "refs").mkdir(exist_ok=True)
    (cache_root / "refs" / "main").write_text(revision)
    return snapshot


def build(root: Path) -> None:
    """Write tiny ``qwen_instruct`` and ``qwen_base`` at their layout paths under ``root``.

    As in the real checkpoints, the instruct model ends on ``<|im_end|>`` (or ``<|endoftext|>``)
    and the base model on ``<|endoftext|>``.
    """
    tokenizer = train_tokenizer()
    root = Path(root)
    write_cache_folder(root / layout.QWEN_INSTRUCT, "instruct", tokenizer, INSTRUCT_EOS)
    write_cache_folder(root / layout.QWEN_BASE, "base", tokenizer, BASE_EOS)

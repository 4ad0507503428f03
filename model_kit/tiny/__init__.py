"""Tiny random-weight versions of the four models, in the production on-disk layouts.

``build_all(DIR)`` writes them at the same paths (relative to ``DIR``) that the models look for
under ``MODELS_DIR``, offline and deterministically: ``MODELS_DIR=DIR`` is all it takes to run
everything on them. A marker file per model makes a second call cheap.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

BUILDERS = {"sdxl": "model_kit.tiny.sdxl", "wan": "model_kit.tiny.wan", "qwen": "model_kit.tiny.qwen"}
VERSION = 2  # 2: WAN rope length for 161 frames


def build(name: str, root: Path, force: bool = False) -> None:
    """Build one tiny model family (``sdxl``, ``wan`` or ``qwen``) under ``root``."""
    root = Path(root)
    marker = root / ".tiny" / f"{name}.json"
    if marker.exists() and not force and json.loads(marker.read_text()).get("version") == VERSION:
        return
    importlib.import_module(BUILDERS[name]).build(root)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"version": VERSION}))


def build_all(root: Path, force: bool = False) -> Path:
    for name in BUILDERS:
        build(name, root, force=force)
    return Path(root)

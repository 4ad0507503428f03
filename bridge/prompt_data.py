"""Pure: the operator-editable data files of chat, safety and scene detection, validated.

Four YAML files live in ``DATA_DIR`` (default: the packaged ``bridge/data``):

- ``templates.yaml``     system prompts, sampling defaults and token budgets (:class:`TemplatesFile`)
- ``content_mode.yaml``  adult-mode trigger phrases and keywords, the sfw mask (:class:`ContentModeFile`)
- ``scene_rules.yaml``   action / movement / setting / appearance words (:class:`SceneRulesFile`)
- ``safety_terms.yaml``  additions to the content-safety gate's built-in terms (:class:`SafetyTermsFile`)

A file missing from ``DATA_DIR`` falls back to the packaged copy. ``safety_terms.yaml`` in
``DATA_DIR`` is *merged* with the packaged one, and both only add to the gate's built-in
vocabulary (:mod:`bridge.safety_terms`); a file that would remap letters or exempt text is refused,
so no data file can weaken the safety gate. A malformed file raises :class:`DataFileError` naming the
file and the key. :func:`get_data` caches and re-reads a file when it changes; a bad edit then is
logged and the last good copy kept.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

log = logging.getLogger("bridge.prompt_data")

PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "data"
FILES = ("templates.yaml", "content_mode.yaml", "scene_rules.yaml", "safety_terms.yaml")
REQUIRED_TEMPLATES = ("chat", "unrestricted", "roleplay", "sdxl_enhance", "wan_enhance", "admin", "scene_detect")
AGE_PLACEHOLDER = "{AGE}"

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Char = Annotated[str, StringConstraints(min_length=1, max_length=1)]


class DataFileError(ValueError):
    """A data file is missing or malformed; the message names the file and the key."""


class _Strict(BaseModel):
    """Unknown keys are errors, so a typo in an operator's edit is reported, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- templates.yaml
class Template(_Strict):
    """One system prompt with its sampling defaults and token budgets."""

    description: str = ""
    system: Text
    user: str = "{prompt}"
    max_tokens: int = Field(gt=0, le=32768)
    context_tokens: int = Field(gt=0, le=131072)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=3)
    prompt_budget: int | None = Field(None, gt=0, le=512)
    quality_tags: list[Text] = Field(default_factory=list)

    @field_validator("user")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("must contain {prompt}")
        return value

    @model_validator(mode="after")
    def _fits(self) -> "Template":
        if self.max_tokens >= self.context_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be below context_tokens ({self.context_tokens})")
        return self

    def sampling(self, **overrides: Any) -> dict[str, Any]:
        """Sampling parameters for the qwen models: these defaults, then non-None ``overrides``."""
        params: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        if self.top_k is not None:
            params["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            params["repetition_penalty"] = self.repetition_penalty
        params.update({key: value for key, value in overrides.items() if value is not None})
        return params


class TemplatesFile(_Strict):
    templates: dict[str, Template]
    context_types: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete(self) -> "TemplatesFile":
        missing = [name for name in REQUIRED_TEMPLATES if name not in self.templates]
        if missing:
            raise ValueError(f"templates: missing {missing} (required: {list(REQUIRED_TEMPLATES)})")
        unknown = {key: value for key, value in self.context_types.items() if value not in self.templates}
        if unknown:
            raise ValueError(f"context_types: unknown template(s) {unknown}")
        return self

    def for_context_type(self, context_type: str | None) -> str:
        """Template name for an older-shape ``context_type`` (unknown or missing: ``chat``)."""
        return self.context_types.get((context_type or "").strip().lower(), "chat")


# ----------------------------------------------------------------------------- content_mode.yaml
class SfwMask(_Strict):
    replacement: str
    words: list[Text] = Field(min_length=1)


class ContentModeFile(_Strict):
    scan_turns: int = Field(6, ge=1, le=100)
    unrestricted_context_types: list[Text] = Field(default_factory=list)
    trigger_phrases: list[Text] = Field(default_factory=list)
    keyword_threshold: int = Field(2, ge=1)
    keywords: list[Text] = Field(default_factory=list)
    sfw_mask: SfwMask


# ----------------------------------------------------------------------------- scene_rules.yaml
class SceneRulesFile(_Strict):
    action_verbs: list[Text] = Field(min_length=1)
    movement_words: list[Text] = Field(default_factory=list)
    environment_words: list[Text] = Field(min_length=1)
    atmosphere_words: list[Text] = Field(default_factory=list)
    appearance_cues: list[Text] = Field(default_factory=list)
    not_names: list[Text] = Field(default_factory=list)
    dangling_words: list[Text] = Field(default_factory=list)
    min_signals: int = Field(2, ge=1)
    max_actions: int = Field(3, ge=1, le=10)


# ----------------------------------------------------------------------------- safety_terms.yaml
def _check_regex(value: str) -> str:
    try:
        re.compile(value.replace(AGE_PLACEHOLDER, "(?P<age>1)"))
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc}): {value!r}") from None
    return value


class SafetyTermsFile(_Strict):
    """The operator's ADDITIONS to the safety gate's built-in vocabulary (bridge/safety_terms.py).
    Entries that would weaken the gate are refused (docs/ARCHITECTURE.md, "Content-safety gate"):
    a homoglyph or leetspeak entry that maps a letter or digit to something else, a separator that
    is a letter or digit, a number word that reads a different age than the built-in one, and
    allowed phrases (text the gate would skip) at all."""

    minor_terms: list[Text] = Field(default_factory=list)
    sexual_terms: list[Text] = Field(default_factory=list)
    age_patterns: list[Text] = Field(default_factory=list)
    minor_patterns: list[Text] = Field(default_factory=list)
    number_words: dict[Text, int] = Field(default_factory=dict)
    leetspeak: dict[Char, Text] = Field(default_factory=dict)
    homoglyphs: dict[Char, Text] = Field(default_factory=dict)
    allowed_phrases: list[Text] = Field(default_factory=list)
    separators: str = ""

    @field_validator("age_patterns")
    @classmethod
    def _age_patterns(cls, values: list[str]) -> list[str]:
        for index, value in enumerate(values):
            if AGE_PLACEHOLDER not in value:
                raise ValueError(f"[{index}] must contain {AGE_PLACEHOLDER}: {value!r}")
            _check_regex(value)
        return values

    @field_validator("minor_patterns")
    @classmethod
    def _minor_patterns(cls, values: list[str]) -> list[str]:
        return [_check_regex(value) for value in values]

    @field_validator("allowed_phrases")
    @classmethod
    def _no_exemptions(cls, values: list[str]) -> list[str]:
        if values:
            raise ValueError("the safety gate's allowed phrases are built in (bridge/safety_terms.py); a data file "
                             "may add terms, never exempt text from the gate")
        return values

    @field_validator("separators")
    @classmethod
    def _separators(cls, value: str) -> str:
        if any(ch.isalnum() for ch in value):
            raise ValueError("a separator may not be a letter or digit: that would delete letters from every "
                             "prompt before the safety gate reads it")
        return value

    @field_validator("leetspeak")
    @classmethod
    def _leetspeak(cls, values: dict[str, str]) -> dict[str, str]:
        for char, replacement in values.items():
            if char.isalnum() or not replacement.isalpha():
                raise ValueError(f"{char!r} -> {replacement!r} would remap a letter or digit (only a symbol may be "
                                 "read as letters)")
        return values

    @field_validator("homoglyphs")
    @classmethod
    def _homoglyphs(cls, values: dict[str, str]) -> dict[str, str]:
        from bridge.safety_text import fold  # (the gate's own folding; imported late: it loads Unicode data)

        for char, replacement in values.items():
            plain = fold(char)
            if char.isascii() or not replacement.isascii() or not replacement.isalpha() \
                    or (plain != char.casefold() and plain != replacement.casefold()):
                raise ValueError(f"{char!r} -> {replacement!r} would remap a letter away from what Unicode's "
                                 "confusables data says it imitates")
        return values

    @field_validator("number_words")
    @classmethod
    def _number_words(cls, values: dict[str, int]) -> dict[str, int]:
        from bridge.safety_terms import NUMBER_WORDS

        for word, value in values.items():
            if word.casefold() in NUMBER_WORDS and NUMBER_WORDS[word.casefold()] != value:
                raise ValueError(f"{word!r} is {NUMBER_WORDS[word.casefold()]}, not {value}: a data file may add "
                                 "number words, never change the built-in ones")
        return values

    def merged(self, extra: "SafetyTermsFile") -> "SafetyTermsFile":
        """This list plus ``extra``'s entries (an operator's copy extends, never shrinks, the gate)."""

        def union(a: list[str], b: list[str]) -> list[str]:
            return list(dict.fromkeys([*a, *b]))

        return SafetyTermsFile(
            minor_terms=union(self.minor_terms, extra.minor_terms),
            sexual_terms=union(self.sexual_terms, extra.sexual_terms),
            age_patterns=union(self.age_patterns, extra.age_patterns),
            minor_patterns=union(self.minor_patterns, extra.minor_patterns),
            number_words={**extra.number_words, **self.number_words},
            leetspeak={**extra.leetspeak, **self.leetspeak},
            homoglyphs={**extra.homoglyphs, **self.homoglyphs},
            separators="".join(dict.fromkeys(self.separators + extra.separators)),
        )


# ----------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class PromptData:
    """All four data files, validated."""

    templates: TemplatesFile
    content_mode: ContentModeFile
    scene_rules: SceneRulesFile
    safety: SafetyTermsFile
    source: Path

    def template(self, name: str) -> Template:
        try:
            return self.templates.templates[name]
        except KeyError:
            raise KeyError(f"no template {name!r} in templates.yaml (have: {sorted(self.templates.templates)})") from None


_MODELS: dict[str, type[BaseModel]] = {
    "templates.yaml": TemplatesFile,
    "content_mode.yaml": ContentModeFile,
    "scene_rules.yaml": SceneRulesFile,
    "safety_terms.yaml": SafetyTermsFile,
}


def default_data_dir() -> Path:
    """``DATA_DIR`` from the environment, else the packaged data folder."""
    value = os.environ.get("DATA_DIR", "").strip()
    return Path(value) if value else PACKAGED_DATA_DIR


def load_file(path: Path, model: type[BaseModel]) -> BaseModel:
    """Read and validate one YAML file; errors name the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFileError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise DataFileError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(raw, dict):
        raise DataFileError(f"{path}: must be a YAML mapping at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "(top level)"
            problems.append(f"{key}: {err['msg']}")
        raise DataFileError(f"{path}: " + "; ".join(problems)) from None


def _locate(data_dir: Path | str) -> dict[str, tuple[str, os.stat_result | None]]:
    """Where each file is read from (``data_dir`` when it holds it, else the packaged copy) and
    its stat, None when neither is there: one stat a file, as every prompt's safety check asks
    (:func:`get_data`; docs/ARCHITECTURE.md, one job's path: per-job overhead)."""
    located = {}
    for name in FILES:
        packaged = os.path.join(PACKAGED_DATA_DIR, name)
        located[name] = (packaged, None)
        for path in (os.path.join(data_dir, name), packaged):
            try:
                located[name] = (path, os.stat(path))
                break
            except OSError:
                continue
    return located


def _paths(data_dir: Path) -> dict[str, Path]:
    """Where each file is read from: ``data_dir`` when it holds it, else the packaged copy."""
    return {name: Path(path) for name, (path, _) in _locate(data_dir).items()}


def load_data(data_dir: Path | str | None = None) -> PromptData:
    """Read and validate all four files from ``data_dir`` (default :func:`default_data_dir`)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if not data_dir.is_dir():
        raise DataFileError(f"{data_dir}: DATA_DIR is not a folder")
    paths = _paths(data_dir)
    loaded = {name: load_file(path, _MODELS[name]) for name, path in paths.items()}
    safety = loaded["safety_terms.yaml"]
    if paths["safety_terms.yaml"].resolve() != (PACKAGED_DATA_DIR / "safety_terms.yaml").resolve():
        packaged = load_file(PACKAGED_DATA_DIR / "safety_terms.yaml", SafetyTermsFile)
        safety = packaged.merged(safety)  # type: ignore[union-attr, arg-type]
    return PromptData(
        templates=loaded["templates.yaml"],  # type: ignore[arg-type]
        content_mode=loaded["content_mode.yaml"],  # type: ignore[arg-type]
        scene_rules=loaded["scene_rules.yaml"],  # type: ignore[arg-type]
        safety=safety,  # type: ignore[arg-type]
        source=data_dir,
    )


_cache: dict[Path, tuple[tuple, PromptData]] = {}
_lock = threading.Lock()


def _stamp(data_dir: str) -> tuple:
    """(file, mtime, size) of each file :func:`load_data` reads from ``data_dir``."""
    return tuple((path, stat.st_mtime_ns, stat.st_size) if stat else (path, None, None)
                 for path, stat in _locate(data_dir).values())


@functools.lru_cache(maxsize=16)
def _resolved(data_dir: str) -> Path:
    return Path(data_dir).resolve()


def get_data(data_dir: Path | str | None = None) -> PromptData:
    """Cached :func:`load_data`, re-read when a file changes. A bad edit after a good load is
    logged and the last good copy is kept; with no good copy yet, :class:`DataFileError` is raised."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    key = _resolved(str(data_dir))
    stamp = _stamp(str(data_dir))
    with _lock:
        cached = _cache.get(key)
        if cached and cached[0] == stamp:
            return cached[1]
        try:
            data = load_data(data_dir)
        except DataFileError as exc:
            if cached is None:
                raise
            log.error("keeping the last good data files: %s", exc)
            _cache[key] = (stamp, cached[1])
            return cached[1]
        _cache[key] = (stamp, data)
        return data

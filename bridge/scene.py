"""Pure: scene detection for one-click generation (``POST /scene/detect``).

:func:`detect_scene_rules` reads a roleplay reply with the word lists of ``scene_rules.yaml``:
actions (verbs, ``*asterisk actions*``), the setting (places, time of day, light), the characters
(given names and aliases, or a capitalised word before an action) and appearance details.
:func:`detect_scene` adds one LLM pass through an injected ``generate`` coroutine (the API wires it
to ``qwen_instruct`` through Triton) and falls back to the rules alone, saying so in ``note``, when
there is no model or it fails, times out or answers with something that is not the JSON asked for.

Either way the SDXL prompt starts with each found character's stated appearance, fits the
``scene_detect`` template's budget (75 CLIP tokens, quality tags included) through
:func:`bridge.chat.fit_prompt`, and passes the safety gate (:mod:`bridge.safety`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Any, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bridge.chat import count_tokens, fit_prompt
from bridge.prompt_data import PromptData, SceneRulesFile, get_data
from bridge.safety import check_prompt

log = logging.getLogger(__name__)

Generate = Callable[[list[dict[str, str]]], Awaitable[str]]
MAX_INPUT_CHARS = 6000  # of the reply sent to the model
#: Aliases per character and characters per alias: all of a character's names become one regular
#: expression, whose compile time grows with their total length (docs/API.md, "Limits").
MAX_ALIASES = 20
MAX_ALIAS_CHARS = 100
_ACTION_WORDS = 8  # words an action phrase keeps at most (from its verb)
_PRONOUNS = re.compile(r"\b(?:i|me|my|she|he|her|his|him)\b", re.IGNORECASE)


class CharacterDesc(BaseModel):
    """A character of the story and their stated appearance."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=200)
    appearance: str = Field("", max_length=2000)
    aliases: list[Annotated[str, Field(max_length=MAX_ALIAS_CHARS)]] = Field(default_factory=list,
                                                                             max_length=MAX_ALIASES)


class SceneResult(BaseModel):
    """What scene detection found, and the SDXL prompt for it."""

    has_scene: bool
    characters_found: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)
    setting: str = ""
    prompt: str = ""
    used_model: bool = False
    note: str | None = None
    prompt_trimmed: bool = False
    prompt_tokens: int | None = None
    refused: bool = False


# ----------------------------------------------------------------------------- rules
def _verb_forms(entry: str) -> set[str]:
    """Forms of a verb entry ``base[/irregular...]`` by the regular English rules: -s/-es/-ies,
    -ed/-d/-ied, -ing (e-drop, ie -> ying) and final consonant doubling for one-vowel verbs
    ("sit" -> "sitting")."""
    base, *irregular = [part.strip().lower() for part in entry.split("/") if part.strip()]
    consonant_y = len(base) > 1 and base.endswith("y") and base[-2] not in "aeiou"
    cvc = len(base) >= 3 and base[-1] not in "aeiouwxy" and base[-2] in "aeiou" and base[-3] not in "aeiou"
    stem = base + base[-1] if cvc and sum(ch in "aeiou" for ch in base) == 1 else base
    if base.endswith(("s", "x", "z", "ch", "sh")):
        third = base + "es"
    elif consonant_y:
        third = base[:-1] + "ies"
    else:
        third = base + "s"
    if base.endswith("e"):
        past = base + "d"
    elif consonant_y:
        past = base[:-1] + "ied"
    else:
        past = stem + "ed"
    if base.endswith("ie"):
        ing = base[:-2] + "ying"
    elif base.endswith("e") and not base.endswith("ee"):
        ing = base[:-1] + "ing"
    else:
        ing = stem + "ing"
    return {base, third, past, ing, *irregular}


def _words_regex(words: list[str], plural: bool = True) -> re.Pattern[str] | None:
    if not words:
        return None
    parts = sorted({r"\s+".join(map(re.escape, w.lower().split())) for w in words}, key=len, reverse=True)
    suffix = r"(?:e?s)?" if plural else ""
    return re.compile(r"(?<![\w'])(" + "|".join(parts) + ")" + suffix + r"(?![\w'])", re.IGNORECASE)


class _Rules:
    """Compiled form of one :class:`SceneRulesFile`."""

    def __init__(self, rules: SceneRulesFile) -> None:
        self.rules = rules
        forms = set().union(*(_verb_forms(entry) for entry in rules.action_verbs))
        self.verb_re = _words_regex(sorted(forms), plural=False)
        self.movement_re = _words_regex(rules.movement_words, plural=False)
        self.env_re = _words_regex(rules.environment_words)
        self.atmosphere_re = _words_regex(rules.atmosphere_words, plural=False)
        self.appearance_re = _words_regex(rules.appearance_cues)
        self.not_names = {word.lower() for word in rules.not_names}
        self.dangling = {word.lower() for word in rules.dangling_words}


_compiled: dict[int, tuple[SceneRulesFile, _Rules]] = {}


def _rules_for(data: PromptData) -> _Rules:
    """One compiled :class:`_Rules` per (immutable) rules file."""
    entry = _compiled.get(id(data.scene_rules))
    if entry is None or entry[0] is not data.scene_rules:
        if len(_compiled) > 8:
            _compiled.clear()
        entry = (data.scene_rules, _Rules(data.scene_rules))
        _compiled[id(data.scene_rules)] = entry
    return entry[1]


def _name_regex(character: CharacterDesc) -> re.Pattern[str]:
    names = [re.escape(n.strip()) for n in (character.name, *character.aliases) if n.strip()]
    return re.compile(r"(?<!\w)(?:" + "|".join(names) + r")(?!\w)", re.IGNORECASE)


def _find_characters(text: str, characters: list[CharacterDesc], rules: _Rules) -> list[CharacterDesc]:
    """Given characters named in ``text``; else a capitalised word before an action verb; else,
    when the reply speaks of someone by pronoun only, the first given character (the speaker)."""
    found = [c for c in characters if _name_regex(c).search(text)]
    if found:
        return found
    named: list[CharacterDesc] = []
    for match in re.finditer(r"\b([A-Z][a-z]+)\s+(\w+)", text):
        name, verb = match.groups()
        if name.lower() not in rules.not_names and rules.verb_re and rules.verb_re.fullmatch(verb):
            if name not in {c.name for c in named}:
                named.append(CharacterDesc(name=name))
    if named:
        return named
    if characters and _PRONOUNS.search(text):
        return [characters[0]]
    return []


def _actions(text: str, rules: _Rules) -> list[str]:
    """Short action phrases: ``*asterisk actions*`` first, then verb + the words after it."""
    phrases: list[str] = []
    starred = re.findall(r"\*([^*\n]{2,200})\*", text)
    for segment in starred:
        if rules.verb_re and rules.verb_re.search(segment):
            phrases.append(_short(segment.split(",")[0], 12, rules.dangling))
    plain = re.sub(r"\*[^*\n]*\*", " ", text) if phrases else text
    for clause in re.split(r"[.!?;:\n\"“”]", plain):
        match = rules.verb_re.search(clause) if rules.verb_re else None
        if match:
            tail = clause[match.start() :].split(",")[0]
            phrases.append(_short(tail, _ACTION_WORDS, rules.dangling))
    unique = list(dict.fromkeys(p for p in phrases if p))
    return unique[: rules.rules.max_actions]


def _short(text: str, max_words: int, dangling: set[str]) -> str:
    """At most ``max_words`` words, lower-cased, not ending on a dangling word ("toward the")."""
    words = re.sub(r"\s+", " ", text).strip(" ,").lower().split(" ")[:max_words]
    while len(words) > 1 and words[-1].strip(" ,") in dangling:
        words.pop()
    return " ".join(words).strip(" ,")


def _setting(text: str, rules: _Rules) -> str:
    places = [m.group(1).lower() for m in rules.env_re.finditer(text)] if rules.env_re else []
    moods = [m.group(1).lower() for m in rules.atmosphere_re.finditer(text)] if rules.atmosphere_re else []
    return ", ".join(list(dict.fromkeys(places))[:3] + list(dict.fromkeys(moods))[:2])


def _appearance_details(text: str, rules: _Rules) -> list[str]:
    """Short clauses of the reply that describe a look ("her silver hair loose")."""
    if rules.appearance_re is None:
        return []
    details = []
    for clause in re.split(r"[,.;!?\n*]", text):
        words = clause.split()
        if 1 < len(words) <= 8 and rules.appearance_re.search(clause):
            details.append(" ".join(words).lower())
    return list(dict.fromkeys(details))[:3]


def _compose(parts: list[str]) -> str:
    cleaned = [re.sub(r"\s+", " ", p).strip(" ,.;") for p in parts]
    return ", ".join(p for p in dict.fromkeys(cleaned) if p)


def _finish_prompt(
    body_parts: list[str], characters: list[CharacterDesc], tokenizer: Any, data: PromptData
) -> tuple[str, bool, int | None, str | None]:
    """Appearance first, then ``body_parts``; fitted to the budget; ``(prompt, trimmed, tokens, problem)``."""
    appearances = [c.appearance.strip() for c in characters if c.appearance.strip()]
    subjects = appearances + [c.name for c in characters if not c.appearance.strip()]
    body = _compose(body_parts)
    for appearance in appearances:  # keep each appearance once, at the front, safe from trimming
        body = re.sub(re.escape(appearance.strip(" ,.")), "", body, flags=re.IGNORECASE)
    prompt = _compose([*subjects, *body.split(",")])
    if tokenizer is None:
        return prompt, False, None, "prompt not budget-checked (no tokenizer given)"
    template = data.template("scene_detect")
    fitted, trimmed = fit_prompt(prompt, tokenizer, template.prompt_budget or 75, template.quality_tags or None)
    return fitted, trimmed, count_tokens(tokenizer, fitted), None


def _result_with_prompt(result: SceneResult, characters: list[CharacterDesc], body: list[str], tokenizer: Any,
                        data: PromptData) -> SceneResult:
    if not result.has_scene:
        return result
    prompt, trimmed, tokens, problem = _finish_prompt(body, characters, tokenizer, data)
    notes = [n for n in (result.note, problem) if n]
    verdict = check_prompt(prompt, data=data)
    if not verdict.allowed:
        return result.model_copy(update={"prompt": "", "refused": True, "note": "; ".join([*notes, verdict.reason or ""])})
    return result.model_copy(
        update={"prompt": prompt, "prompt_trimmed": trimmed, "prompt_tokens": tokens, "note": "; ".join(notes) or None}
    )


def detect_scene_rules(
    text: str,
    characters: list[CharacterDesc] | None = None,
    *,
    tokenizer: Any = None,
    data: PromptData | None = None,
    note: str | None = None,
) -> SceneResult:
    """Rules only. ``tokenizer`` (SDXL's CLIP tokenizer) fits the prompt into its budget."""
    data = data or get_data()
    characters = list(characters or [])
    refused = _input_refused(text, characters, data)
    if refused is not None:
        return refused
    rules = _rules_for(data)
    found = _find_characters(text, characters, rules)
    actions = _actions(text, rules)
    setting = _setting(text, rules)
    signals = len(actions) + (1 if setting else 0) + len([c for c in found if c.name])
    has_scene = bool(actions) and signals >= rules.rules.min_signals
    result = SceneResult(
        has_scene=has_scene,
        characters_found=[c.name for c in found],
        actions=actions,
        setting=setting,
        used_model=False,
        note=note,
    )
    new_setting = [part for part in setting.split(", ") if part and not any(part in action for action in actions)]
    body = [*actions, *_appearance_details(text, rules), *new_setting]
    return _result_with_prompt(result, found, body, tokenizer, data)


def _input_refused(text: str, characters: list[CharacterDesc], data: PromptData) -> SceneResult | None:
    combined = "\n".join([text, *(f"{c.name}: {c.appearance}" for c in characters)])
    verdict = check_prompt(combined, data=data)
    if verdict.allowed:
        return None
    return SceneResult(has_scene=False, refused=True, note=verdict.reason)


# ----------------------------------------------------------------------------- model pass
class _ModelScene(BaseModel):
    """The JSON the ``scene_detect`` template asks the model for (lenient about types)."""

    model_config = ConfigDict(extra="ignore")

    has_scene: bool = False
    characters: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)
    setting: str = ""
    prompt: str = ""

    @field_validator("characters", "actions", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return [str(v) for v in value] if isinstance(value, list) else value

    @field_validator("setting", "prompt", mode="before")
    @classmethod
    def _textify(cls, value: Any) -> Any:
        if value is None:
            return ""
        return ", ".join(map(str, value)) if isinstance(value, list) else value


def scene_messages(text: str, characters: list[CharacterDesc], data: PromptData | None = None) -> list[dict[str, str]]:
    """The chat messages of the model pass (``scene_detect`` template)."""
    template = (data or get_data()).template("scene_detect")
    lines = [f"- {c.name}: {c.appearance.strip() or 'no description'}" for c in characters]
    described = "Characters:\n" + "\n".join(lines) + "\n\n" if lines else ""
    return [
        {"role": "system", "content": template.system},
        {"role": "user", "content": f"{described}Reply:\n{text[:MAX_INPUT_CHARS]}"},
    ]


def parse_model_answer(raw: str) -> _ModelScene | None:
    """The model's JSON answer (code fences and text around it tolerated), or None."""
    text = re.sub(r"```(?:json)?", "", raw or "")
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        return _ModelScene.model_validate(json.loads(text[start : end + 1]))
    except (json.JSONDecodeError, ValidationError, TypeError):
        return None


async def detect_scene(
    text: str,
    characters: list[CharacterDesc] | None,
    generate: Generate | None,
    tokenizer: Any,
    *,
    data: PromptData | None = None,
    timeout_s: float = 30.0,
    lock: AbstractContextManager[Any] | None = None,
    run: Callable[..., Awaitable[SceneResult]] | None = None,
) -> SceneResult:
    """Rules plus one model pass through ``generate``; rules alone (and a ``note`` saying why) when
    ``generate`` is None, raises, times out or answers with no usable JSON. The rules and the
    tokenizer run off the event loop (``run(fn, *args)``: the API's bounded CPU pool; a worker
    thread by default), inside ``lock`` when given (a fast tokenizer is not re-entrant)."""
    data = data or get_data()
    characters = list(characters or [])
    guard = lock if lock is not None else nullcontext()
    off_loop = run or asyncio.to_thread

    def locked(function: Callable[..., SceneResult], *args: Any, **kwargs: Any) -> SceneResult:
        with guard:
            return function(*args, **kwargs)

    async def rules(note: str) -> SceneResult:
        return await off_loop(locked, detect_scene_rules, text, characters, tokenizer=tokenizer, data=data, note=note)

    refused = _input_refused(text, characters, data)
    if refused is not None:
        return refused  # refused content is never sent to the model
    if generate is None:
        return await rules("model unavailable: rules only")
    try:
        raw = await asyncio.wait_for(generate(scene_messages(text, characters, data)), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return await rules(f"model timed out after {timeout_s:g} s: rules only")
    except Exception as exc:  # noqa: BLE001 - any model failure falls back to the rules
        log.warning("scene model pass failed, the rules answer: %s: %s", type(exc).__name__, exc)
        # ``public``: a text meant for the caller (bridge.api_scene.ModelUnavailable); other words stay in the log.
        said = getattr(exc, "public", None) or "the worker's log says why"
        return await rules(f"model failed ({said}): rules only")
    answer = parse_model_answer(raw)
    if answer is None:
        return await rules("model answer was not the JSON asked for: rules only")
    return await off_loop(locked, _combine, text, characters, answer, tokenizer, data)


def _combine(
    text: str, characters: list[CharacterDesc], answer: _ModelScene, tokenizer: Any, data: PromptData
) -> SceneResult:
    """The model decides whether there is a scene; names it gives count only when they occur in
    the reply or the given characters; the rules fill in what the model left out."""
    rules = _rules_for(data)
    by_rules = _find_characters(text, characters, rules)
    found = list(by_rules)
    for name in answer.characters:
        given = next((c for c in characters if c.name.lower() == name.strip().lower()), None)
        candidate = given or CharacterDesc(name=name.strip())
        in_text = _name_regex(candidate).search(text)
        if (given or in_text) and candidate.name.lower() not in {c.name.lower() for c in found}:
            found.append(candidate)
    actions = [a.strip() for a in answer.actions if a.strip()][: rules.rules.max_actions] or _actions(text, rules)
    setting = answer.setting.strip() or _setting(text, rules)
    result = SceneResult(
        has_scene=answer.has_scene,
        characters_found=[c.name for c in found],
        actions=actions,
        setting=setting,
        used_model=True,
    )
    body = [answer.prompt] if answer.prompt.strip() else [*actions, setting]
    return _result_with_prompt(result, found, body, tokenizer, data)

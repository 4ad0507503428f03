"""Scene detection: rules find actions, setting and characters; the prompt keeps each character's
appearance within 75 CLIP tokens (real tiny SDXL tokenizer); the model pass and its fallbacks.

The ``generate`` functions here stand in for the network call to qwen_instruct only; the real
Triton path is exercised by the API tests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bridge import chat
from bridge.prompt_data import get_data
from bridge.safety import REFUSAL_REASON
from bridge.scene import CharacterDesc, SceneResult, detect_scene, detect_scene_rules, parse_model_answer, scene_messages
from model_kit import layout

LUNA = CharacterDesc(name="Luna", appearance="silver hair, green eyes")
KAI = CharacterDesc(name="Kai", appearance="tall man, black coat")
REPLY = (
    "*Luna smiles and walks slowly toward the window, moonlight on her face.* "
    '"It is beautiful tonight," she whispers, while Kai leans against the balcony railing.'
)


@pytest.fixture(scope="module")
def clip_tok(tiny_models_dir: Path):
    return chat.load_tokenizer(tiny_models_dir / layout.SDXL_CONFIG / "tokenizer")


def _canned(answer: dict | str):
    """An async generate() returning a fixed model answer, recording the messages it got."""
    calls: list[list[dict[str, str]]] = []

    async def generate(messages: list[dict[str, str]]) -> str:
        calls.append(messages)
        return answer if isinstance(answer, str) else "```json\n" + json.dumps(answer) + "\n```"

    generate.calls = calls  # type: ignore[attr-defined]
    return generate


def _assert_budget(result: SceneResult, tokenizer) -> None:
    assert result.prompt_tokens is not None
    assert chat.count_tokens(tokenizer, result.prompt) == result.prompt_tokens <= 75
    assert len(tokenizer(result.prompt)["input_ids"]) <= 77


# ----------------------------------------------------------------------------- rules
def test_rules_find_actions_setting_and_characters(clip_tok) -> None:
    result = detect_scene_rules(REPLY, [LUNA, KAI], tokenizer=clip_tok)
    assert result.has_scene and not result.used_model and result.note is None
    assert result.characters_found == ["Luna", "Kai"]
    assert any("walks slowly toward the window" in a for a in result.actions)
    assert any("leans against the balcony" in a for a in result.actions)
    assert "balcony" in result.setting and "moonlight" in result.setting


def test_prompt_keeps_each_appearance_within_75_clip_tokens(clip_tok) -> None:
    result = detect_scene_rules(REPLY, [LUNA, KAI], tokenizer=clip_tok)
    _assert_budget(result, clip_tok)
    tags = ", ".join(get_data().template("scene_detect").quality_tags)
    assert result.prompt.startswith(tags)
    assert LUNA.appearance in result.prompt and KAI.appearance in result.prompt
    assert result.prompt.index(LUNA.appearance) < result.prompt.index(KAI.appearance)


def test_long_scene_is_trimmed_but_appearance_stays(clip_tok) -> None:
    reply = (
        "Mara runs across the wide beach at sunset. She turns and waves at the old lighthouse keeper on the "
        "rocky shore. She climbs the stone stairs toward the castle gate."
    )
    mara = CharacterDesc(name="Mara", appearance="red braid")
    result = detect_scene_rules(reply, [mara], tokenizer=clip_tok)
    assert result.has_scene and result.prompt_trimmed
    _assert_budget(result, clip_tok)
    assert "red braid" in result.prompt
    assert result.actions[1] == "turns and waves at the old lighthouse keeper"  # no dangling "on the"


def test_unknown_named_character_before_an_action(clip_tok) -> None:
    result = detect_scene_rules("Mara runs across the beach at sunset.", [], tokenizer=clip_tok)
    assert result.has_scene and result.characters_found == ["Mara"]
    assert result.actions == ["runs across the beach at sunset"]
    assert result.setting == "beach, sunset"


def test_pronoun_reply_refers_to_the_speaking_character(clip_tok) -> None:
    result = detect_scene_rules("*She sits by the fireplace, sipping tea.*", [LUNA], tokenizer=clip_tok)
    assert result.has_scene and result.characters_found == ["Luna"]
    assert LUNA.appearance in result.prompt


def test_no_scene_in_plain_talk(clip_tok) -> None:
    result = detect_scene_rules("I think that is a great idea. Tell me more about your plans.", [LUNA], tokenizer=clip_tok)
    assert not result.has_scene and result.prompt == "" and result.actions == []


def test_irregular_and_inflected_verbs() -> None:
    assert detect_scene_rules("Kai stood on the bridge at dawn.", [KAI]).actions == ["stood on the bridge at dawn"]
    assert detect_scene_rules("Luna was dancing in the garden.", [LUNA]).actions == ["dancing in the garden"]
    assert detect_scene_rules("Kai was sitting in the cafe.", [KAI]).actions == ["sitting in the cafe"]


def test_without_tokenizer_the_note_says_the_prompt_is_unchecked() -> None:
    result = detect_scene_rules(REPLY, [LUNA, KAI])
    assert result.has_scene and result.prompt_tokens is None and "not budget-checked" in result.note


def test_unsafe_reply_is_refused_without_a_prompt(clip_tok) -> None:
    child = CharacterDesc(name="Pip", appearance="a small child")
    result = detect_scene_rules("*Pip walks into the bedroom, nude.*", [child], tokenizer=clip_tok)
    assert result.refused and not result.has_scene and result.prompt == ""
    assert result.note == REFUSAL_REASON


# ----------------------------------------------------------------------------- model pass
async def test_model_pass_combines_with_rules(clip_tok) -> None:
    generate = _canned(
        {
            "has_scene": True,
            "characters": ["Luna", "Bob"],  # Bob is not in the reply: ignored
            "actions": ["walking to the window"],
            "setting": "balcony, night sky",
            "prompt": "woman walking to a window, silver hair, green eyes, moonlight, night sky",
        }
    )
    result = await detect_scene(REPLY, [LUNA, KAI], generate, clip_tok)
    assert result.used_model and result.has_scene and result.note is None
    assert result.characters_found == ["Luna", "Kai"]
    assert result.actions == ["walking to the window"] and result.setting == "balcony, night sky"
    _assert_budget(result, clip_tok)
    assert LUNA.appearance in result.prompt and KAI.appearance in result.prompt
    assert result.prompt.count("silver hair") == 1  # the model's copy was folded into the front one
    (messages,) = generate.calls
    assert messages[0]["content"] == get_data().template("scene_detect").system
    assert "Luna: silver hair, green eyes" in messages[1]["content"] and REPLY in messages[1]["content"]


async def test_model_can_say_there_is_no_scene(clip_tok) -> None:
    generate = _canned({"has_scene": False, "characters": [], "actions": [], "setting": "", "prompt": ""})
    result = await detect_scene(REPLY, [LUNA], generate, clip_tok)
    assert result.used_model and not result.has_scene and result.prompt == ""


async def test_fallback_when_model_is_unavailable(clip_tok) -> None:
    result = await detect_scene(REPLY, [LUNA, KAI], None, clip_tok)
    assert not result.used_model and result.has_scene
    assert result.note == "model unavailable: rules only"
    assert result.prompt == detect_scene_rules(REPLY, [LUNA, KAI], tokenizer=clip_tok).prompt


async def test_fallback_when_model_raises(clip_tok, caplog) -> None:
    async def broken(messages):
        raise ConnectionError("triton is down at 127.0.0.1:8001")

    result = await detect_scene(REPLY, [LUNA], broken, clip_tok)
    assert not result.used_model and result.has_scene
    # The answer says what happened; the exception's words (an address here) are for the log only.
    assert "model failed (the worker's log says why): rules only" == result.note
    assert any("ConnectionError: triton is down" in r.getMessage() for r in caplog.records)


async def test_fallback_when_model_times_out(clip_tok) -> None:
    async def slow(messages):
        await asyncio.sleep(10)
        return "{}"

    result = await detect_scene(REPLY, [LUNA], slow, clip_tok, timeout_s=0.05)
    assert not result.used_model and "timed out" in result.note and result.has_scene


async def test_fallback_when_model_answer_is_not_json(clip_tok) -> None:
    result = await detect_scene(REPLY, [LUNA], _canned("Sure! There is a lovely scene here."), clip_tok)
    assert not result.used_model and "not the JSON" in result.note and result.has_scene


async def test_refused_input_never_reaches_the_model(clip_tok) -> None:
    generate = _canned({"has_scene": True, "prompt": "x"})
    result = await detect_scene("*The kid walks in, naked.*", [], generate, clip_tok)
    assert result.refused and result.prompt == "" and generate.calls == []


async def test_unsafe_model_prompt_is_refused(clip_tok) -> None:
    generate = _canned({"has_scene": True, "characters": ["Luna"], "actions": ["posing"], "prompt": "nude teen, bedroom"})
    result = await detect_scene("*Luna walks into the bedroom.*", [LUNA], generate, clip_tok)
    assert result.used_model and result.refused and result.prompt == ""


def test_parse_model_answer_is_lenient_about_types() -> None:
    answer = parse_model_answer('Here: {"has_scene": true, "characters": "Luna, Kai", "setting": ["beach", "dusk"]} ok')
    assert answer is not None and answer.characters == ["Luna", "Kai"] and answer.setting == "beach, dusk"
    assert parse_model_answer("no json") is None
    assert parse_model_answer('{"has_scene": "maybe?"}') is None


def test_scene_messages_cap_the_reply_length() -> None:
    messages = scene_messages("x" * 50_000, [])
    assert len(messages[1]["content"]) < 7000 and "Characters" not in messages[1]["content"]

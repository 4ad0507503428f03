"""bridge.chat with the real tiny tokenizers: request shapes, limits, context trimming, content
mode, sfw masking and prompt budgets (SDXL 75 CLIP tokens, WAN 100)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import chat
from bridge.chat import (
    BudgetError,
    ChatRequestError,
    Conversation,
    Turn,
    build_messages,
    count_chat_tokens,
    count_tokens,
    detect_content_mode,
    fit_prompt,
    mask_sfw,
    parse_chat_request,
)
from bridge.prompt_data import PACKAGED_DATA_DIR, get_data, load_data
from bridge.safety import MINOR_RULE
from model_kit import layout

QUALITY_TAGS = ["score_9", "score_8_up", "masterpiece", "best quality"]
LONG_SCENE = (
    "A woman with long red hair walks along the beach at sunset. Waves crash on the shore, seagulls "
    "circle overhead, golden light on the wet sand. She smiles at the camera, wind in her hair, wearing "
    "a flowing white dress. In the distance a lighthouse glows, boats drift on calm water, and the sky "
    "fades from orange to violet while the first stars appear."
)


# ----------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def qwen_tok(tiny_models_dir: Path):
    return chat.load_tokenizer(tiny_models_dir / layout.QWEN_INSTRUCT)


@pytest.fixture(scope="module")
def clip_tok(tiny_models_dir: Path):
    from transformers import CLIPTokenizer

    tokenizer = chat.load_tokenizer(tiny_models_dir / layout.SDXL_CONFIG / "tokenizer")
    assert isinstance(tokenizer, CLIPTokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def wan_tok(tiny_models_dir: Path):
    return chat.load_tokenizer(tiny_models_dir / layout.WAN_DIFFUSERS / "tokenizer")


def test_load_tokenizer_resolves_hf_cache_and_caches(tiny_models_dir: Path, qwen_tok) -> None:
    from transformers import AutoTokenizer

    from model_kit.common import resolve_hf_folder

    snapshot = resolve_hf_folder(tiny_models_dir / layout.QWEN_INSTRUCT)
    assert "snapshots" in snapshot.parts
    assert chat.load_tokenizer(snapshot) is qwen_tok  # same folder, same cached instance
    direct = AutoTokenizer.from_pretrained(snapshot)
    assert qwen_tok("hello world")["input_ids"] == direct("hello world")["input_ids"]


def test_the_text_service_looks_for_a_tokenizer_until_it_is_there_then_keeps_it(tiny_models_dir: Path, tmp_path: Path,
                                                                                   qwen_tok) -> None:
    """The weights may come after the worker starts (bridge/weights.py); once read, a model's
    tokenizer is kept: finding its folder again on every chat turn cost the busy bridge GIL turns."""
    from bridge.settings import Settings
    from bridge.textgen import TextService

    text = TextService(Settings(models_dir=tmp_path), triton=None, residency=None)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        text.tokenizer("qwen_instruct")
    shutil.copytree(tiny_models_dir / layout.QWEN_INSTRUCT, tmp_path / layout.QWEN_INSTRUCT, symlinks=True)
    found = text.tokenizer("qwen_instruct")
    assert found("hello world")["input_ids"] == qwen_tok("hello world")["input_ids"]
    shutil.rmtree(tmp_path / layout.QWEN_INSTRUCT)
    assert text.tokenizer("qwen_instruct") is found  # kept, not looked for again


def test_clip_counts_exclude_bos_and_eos(clip_tok) -> None:
    text = "a woman walks on the beach"
    assert chat.usable_tokens(clip_tok) == 75
    assert count_tokens(clip_tok, text) == len(clip_tok(text)["input_ids"]) - 2
    assert count_tokens(clip_tok, "") == 0


# ----------------------------------------------------------------------------- request shapes
def test_messages_shape_normalises() -> None:
    request = parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are you?"},
            ],
            "max_tokens": 100,
            "sfw_mode": True,
            "unknown_field": 1,
        }
    )
    conversation = request.conversation()
    assert conversation.system_prompt == "Be brief."
    assert [t.role for t in conversation.turns] == ["user", "assistant", "user"]
    assert conversation.latest_user == "How are you?"
    assert request.sfw_mode is True and request.max_tokens == 100 and request.temperature is None


def test_older_shape_normalises() -> None:
    request = parse_chat_request(
        {
            "message": "What do you see?",
            "system_prompt": "You are Luna, a ship's navigator.",
            "conversation_id": "c-1",
            "context_type": "character_roleplay",
            "conversation_history": [
                {"sender": "user", "content": "Hello Luna"},
                {"sender": "character", "content": "*waves* Hello!"},
                {"sender": "user", "content": "What do you see?"},  # the app repeats the current message
            ],
        }
    )
    conversation = request.conversation()
    assert conversation.system_prompt == "You are Luna, a ship's navigator."
    assert conversation.conversation_id == "c-1" and conversation.context_type == "character_roleplay"
    assert [(t.role, t.content) for t in conversation.turns] == [
        ("user", "Hello Luna"),
        ("assistant", "*waves* Hello!"),
        ("user", "What do you see?"),
    ]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "either 'messages' or 'message'"),
        ({"message": "a", "messages": [{"role": "user", "content": "b"}]}, "not both"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last non-system"),
        ({"messages": [{"role": "narrator", "content": "a"}]}, "messages.0.role"),
        ({"message": "   "}, "must not be empty"),
        ({"message": "hi", "temperature": 5}, "temperature"),
        ({"message": "hi", "conversation_history": [{"content": "no sender"}]}, "conversation_history.0.sender"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_requests_name_the_problem(payload, fragment: str) -> None:
    with pytest.raises(ChatRequestError, match=re.escape(fragment)):
        parse_chat_request(payload)


def test_history_keeps_last_20_turns() -> None:
    history = [{"sender": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(30)]
    conversation = parse_chat_request({"message": "now", "conversation_history": history}).conversation()
    assert len(conversation.history) == chat.MAX_HISTORY_TURNS == 20
    assert conversation.history[0].content == "turn 10" and conversation.history[-1].content == "turn 29"
    assert conversation.history_dropped == 10
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(25)] + [
        {"role": "user", "content": "last"}
    ]
    limited = parse_chat_request({"messages": messages}).conversation()
    assert len(limited.history) == 20 and limited.history_dropped == 5 and limited.latest_user == "last"


def test_turns_are_cut_to_2000_characters() -> None:
    long_turn = "word " * 1000  # 5,000 characters
    conversation = parse_chat_request(
        {"message": "hi", "conversation_history": [{"sender": "assistant", "content": long_turn}]}
    ).conversation()
    kept = conversation.history[0].content
    assert len(kept) <= chat.MAX_TURN_CHARS == 2000
    assert len(kept) > 1900 and long_turn.startswith(kept) and kept.endswith("word")
    assert conversation.turns_truncated == 1


# ----------------------------------------------------------------------------- context budget
def _conversation(turns: int, words: int = 40, system: str | None = "You are a helpful test assistant.") -> Conversation:
    history = [
        Turn(role="user" if i % 2 == 0 else "assistant", content=f"turn {i}: " + "the quick brown fox " * (words // 4))
        for i in range(turns)
    ]
    return Conversation(system_prompt=system, turns=[*history, Turn(role="user", content="And now, the question?")])


def test_build_messages_fits_without_trimming(qwen_tok) -> None:
    conversation = _conversation(4)
    template = get_data().template("chat")
    built = build_messages(conversation, template, qwen_tok, context_tokens=4096, max_new_tokens=256)
    messages, trimmed, dropped = built
    assert not trimmed and dropped == 0
    assert messages[0] == {"role": "system", "content": f"You are a helpful test assistant.\n\n{MINOR_RULE}"}
    assert [m["content"] for m in messages[1:]] == [t.content for t in conversation.turns]
    assert built.prompt_tokens == count_chat_tokens(qwen_tok, messages)
    rendered = qwen_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert built.prompt_tokens == len(qwen_tok(rendered, add_special_tokens=False)["input_ids"])


def test_build_messages_drops_oldest_first_and_keeps_system(qwen_tok) -> None:
    conversation = _conversation(20)
    template = get_data().template("chat")
    full = count_chat_tokens(
        qwen_tok, [{"role": "system", "content": conversation.system_prompt}] + [t.model_dump() for t in conversation.turns]
    )
    context, new_tokens = full // 2 + 100, 100
    built = build_messages(conversation, template, qwen_tok, context_tokens=context, max_new_tokens=new_tokens)
    messages, trimmed, dropped = built
    assert trimmed and 0 < dropped < 20 and not built.user_message_trimmed
    assert messages[0]["content"] == f"{conversation.system_prompt}\n\n{MINOR_RULE}"  # the gate's rule stays
    assert messages[-1]["content"] == conversation.latest_user
    kept = [m["content"] for m in messages[1:-1]]
    assert kept == [t.content for t in conversation.history[dropped:]]  # the newest turns, oldest dropped
    assert built.prompt_tokens <= context - new_tokens
    # and no more than needed was dropped
    one_more = [messages[0], conversation.history[dropped - 1].model_dump(), *messages[1:]]
    assert count_chat_tokens(qwen_tok, one_more) > context - new_tokens


def test_build_messages_cuts_start_of_long_latest_message(qwen_tok) -> None:
    words = [f"w{i}" for i in range(800)]
    conversation = Conversation(
        system_prompt="Short system.",
        turns=[Turn(role="assistant", content="old reply"), Turn(role="user", content=" ".join(words))],
    )
    built = build_messages(conversation, get_data().template("chat"), qwen_tok, context_tokens=600, max_new_tokens=100)
    assert built.trimmed and built.user_message_trimmed and built.dropped_turns == 1
    assert built.prompt_tokens <= 500
    assert [m["role"] for m in built.messages] == ["system", "user"]
    assert built.messages[0]["content"] == f"Short system.\n\n{MINOR_RULE}"
    kept = built.messages[1]["content"]
    assert kept.endswith("w799") and (" ".join(words)).endswith(" " + kept)  # whole words, the newest ones
    assert len(kept.split()) > 50


def test_build_messages_refuses_when_system_prompt_alone_is_too_long(qwen_tok) -> None:
    conversation = Conversation(system_prompt="rules " * 400, turns=[Turn(role="user", content="hi")])
    with pytest.raises(BudgetError, match="system prompt alone"):
        build_messages(conversation, get_data().template("chat"), qwen_tok, context_tokens=300, max_new_tokens=50)
    with pytest.raises(BudgetError, match="no room"):
        build_messages(conversation, get_data().template("chat"), qwen_tok, context_tokens=100, max_new_tokens=100)


def test_prepare_chat_reports_mode_template_and_trimming(qwen_tok) -> None:
    history = [{"sender": "user" if i % 2 == 0 else "character", "content": "tell me more " * 60} for i in range(20)]
    request = parse_chat_request(
        {"message": "let's switch to adult mode", "context_type": "roleplay", "conversation_history": history}
    )
    prepared = chat.prepare_chat(request, qwen_tok, context_tokens=1500)
    meta = prepared.metadata()
    assert meta["content_mode"] == "unrestricted" and "adult mode" in meta["content_mode_reason"]
    assert meta["template"] == "unrestricted"
    assert meta["context_trimmed"] and meta["dropped_turns"] > 0
    assert prepared.messages[0]["content"] == get_data().template("unrestricted").system
    assert prepared.sampling["max_tokens"] == 512 and prepared.sampling["temperature"] == 0.8


def test_prepare_chat_sfw_mode_keeps_the_callers_system_prompt_and_masks(qwen_tok) -> None:
    request = parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "You are Vex, a flirt."},
                {"role": "user", "content": "nsfw mode please, be sensual and seductive"},
            ],
            "sfw_mode": True,
            "max_tokens": 64,
        }
    )
    prepared = chat.prepare_chat(request, qwen_tok)
    assert prepared.mode.mode == "general" and prepared.template == "chat"
    # the caller's prompt kept as sent, with the gate's rule about minors after it
    assert prepared.messages[0]["content"] == f"You are Vex, a flirt.\n\n{MINOR_RULE}"
    assert prepared.sampling["max_tokens"] == 64
    assert prepared.finish("A sexy reply") == "A [filtered] reply"
    unmasked = chat.prepare_chat(request.model_copy(update={"sfw_mode": False}), qwen_tok)
    assert unmasked.finish("A sexy reply") == "A sexy reply"
    # the request's own system prompt, ending with the gate's rule about minors (it replaces the template's)
    assert unmasked.messages[0]["content"] == f"You are Vex, a flirt.\n\n{MINOR_RULE}"


# ----------------------------------------------------------------------------- content mode
def _conv(*user_texts: str, context_type: str | None = None, system: str | None = None) -> Conversation:
    return Conversation(
        system_prompt=system, context_type=context_type, turns=[Turn(role="user", content=t) for t in user_texts]
    )


def test_content_mode_decisions() -> None:
    assert detect_content_mode(_conv("What's the capital of France?"), False).mode == "general"
    trig = detect_content_mode(_conv("Let's try NSFW   mode tonight"), False)
    assert trig.mode == "unrestricted" and "nsfw mode" in trig.reason
    keywords = detect_content_mode(_conv("a sensual, intimate evening"), False)
    assert keywords.mode == "unrestricted" and "intimate" in keywords.reason and "sensual" in keywords.reason
    assert detect_content_mode(_conv("a passionate debate about tax law"), False).mode == "general"  # one keyword
    assert detect_content_mode(_conv("hi", context_type="adult_roleplay"), False).mode == "unrestricted"
    assert detect_content_mode(_conv("hi", system="This is an adults only story."), False).mode == "unrestricted"


def test_sfw_mode_forces_general() -> None:
    decision = detect_content_mode(_conv("nsfw mode, sensual and seductive", context_type="adult"), True)
    assert decision.mode == "general" and "sfw_mode" in decision.reason


def test_only_user_turns_and_system_prompt_drive_the_mode() -> None:
    conversation = Conversation(
        turns=[Turn(role="assistant", content="sensual, intimate, seductive"), Turn(role="user", content="ok")]
    )
    assert detect_content_mode(conversation, False).mode == "general"


def test_template_name_choice() -> None:
    general = chat.ModeDecision(mode="general", reason="x")
    adult = chat.ModeDecision(mode="unrestricted", reason="x")
    assert chat.template_name(_conv("hi", context_type="roleplay"), general) == "roleplay"
    assert chat.template_name(_conv("hi", context_type="mystery"), general) == "chat"
    assert chat.template_name(_conv("hi", context_type="roleplay"), adult) == "unrestricted"
    assert chat.template_name(_conv("hi", context_type="admin"), adult) == "admin"


def test_content_mode_words_come_from_the_data_file(tmp_path: Path) -> None:
    target = tmp_path / "data"
    shutil.copytree(PACKAGED_DATA_DIR, target)
    path = target / "content_mode.yaml"
    content = yaml.safe_load(path.read_text())
    content["trigger_phrases"] = ["purple giraffe"]
    content["sfw_mask"] = {"replacement": "###", "words": ["giraffe"]}
    path.write_text(yaml.safe_dump(content))
    data = load_data(target)
    assert detect_content_mode(_conv("the purple giraffe"), False, data).mode == "unrestricted"
    assert detect_content_mode(_conv("nsfw mode"), False, data).mode == "general"
    assert mask_sfw("Two Giraffes and a sexy cat", data) == "Two ### and a sexy cat"


def test_mask_sfw_whole_words_any_case() -> None:
    assert mask_sfw("She looked SEXY in the Nude photo, nudes too.") == (
        "She looked [filtered] in the [filtered] photo, [filtered] too."
    )
    untouched = "Sussex nudibranch sextant, Essex unsexed"
    assert mask_sfw(untouched) == untouched


# ----------------------------------------------------------------------------- prompt budgets
def _assert_clean_cut(original: str, body: str) -> None:
    """``body`` is a prefix of ``original`` that ends at a sentence or comma boundary."""
    assert original.startswith(body)
    rest = original[len(body) :]
    assert body[-1] in ".!?" or rest.startswith(","), (body, rest[:20])


def test_fit_prompt_short_prompt_unchanged_with_tags(clip_tok) -> None:
    prompt, trimmed = fit_prompt("a red fox", clip_tok, 75, QUALITY_TAGS)
    assert prompt == "score_9, score_8_up, masterpiece, best quality, a red fox" and not trimmed
    again, _ = fit_prompt(prompt, clip_tok, 75, QUALITY_TAGS)
    assert again == prompt  # tags already there are not added twice


def test_fit_prompt_sdxl_75_clip_tokens_with_tags(clip_tok) -> None:
    prompt, trimmed = fit_prompt(LONG_SCENE, clip_tok, 75, QUALITY_TAGS)
    assert trimmed and count_tokens(clip_tok, prompt) <= 75
    assert len(clip_tok(prompt)["input_ids"]) <= 77
    prefix = ", ".join(QUALITY_TAGS) + ", "
    assert prompt.startswith(prefix)
    _assert_clean_cut(LONG_SCENE, prompt[len(prefix) :])


def test_fit_prompt_wan_100_tokens(wan_tok) -> None:
    prompt, trimmed = fit_prompt(LONG_SCENE, wan_tok, 100)
    assert trimmed and 50 < count_tokens(wan_tok, prompt) <= 100
    _assert_clean_cut(LONG_SCENE, prompt)


def test_fit_prompt_single_clause_falls_back_to_whole_words(clip_tok) -> None:
    text = " ".join(["glowing"] * 60)
    prompt, trimmed = fit_prompt(text, clip_tok, 40)
    assert trimmed and count_tokens(clip_tok, prompt) <= 40
    assert set(prompt.split(" ")) == {"glowing"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.sampled_from(["sunset", "beach", "a", "woman", "red", "hair", "golden", "light,", "waves.", "sky,"]), min_size=1, max_size=80),
    budget=st.integers(min_value=20, max_value=90),
    with_tags=st.booleans(),
)
def test_fit_prompt_never_cuts_mid_word_property(clip_tok, words: list[str], budget: int, with_tags: bool) -> None:
    text = " ".join(words)
    tags = QUALITY_TAGS if with_tags else None
    prompt, trimmed = fit_prompt(text, clip_tok, budget, tags)
    assert count_tokens(clip_tok, prompt) <= budget
    assert set(re.findall(r"[\w']+", prompt)) <= set(re.findall(r"[\w']+", text + " " + ", ".join(QUALITY_TAGS)))
    if not trimmed:
        assert prompt.endswith(text.strip(",; "))


# ----------------------------------------------------------------------------- enhancement
def test_enhancement_messages_use_templates() -> None:
    sdxl = chat.enhancement_messages("sdxl", "a cat {curly} in space")
    assert sdxl[0] == {"role": "system", "content": get_data().template("sdxl_enhance").system}
    assert sdxl[1]["role"] == "user" and "a cat {curly} in space" in sdxl[1]["content"]
    wan = chat.enhancement_messages("wan", "a cat")
    assert wan[0]["content"] == get_data().template("wan_enhance").system != sdxl[0]["content"]


def test_finish_enhancement_sdxl_trims_and_reports(clip_tok) -> None:
    result = chat.finish_enhancement("sdxl", f'Enhanced prompt: "{LONG_SCENE}"', clip_tok, original="a woman at the beach")
    assert result.prompt.startswith("score_9, score_8_up") and result.tokens <= 75 == result.budget
    assert result.trimmed and not result.fell_back and "trimmed" in result.note
    meta = result.metadata()
    assert meta["prompt_trimmed"] is True and meta["original_prompt"] == "a woman at the beach"
    assert meta["enhanced_prompt"] == result.prompt and '"' not in result.prompt and "Enhanced" not in result.prompt


def test_finish_enhancement_falls_back_on_empty_answer(wan_tok) -> None:
    result = chat.finish_enhancement("wan", "   ", wan_tok, original="a fox in the snow")
    assert result.fell_back and result.prompt == "a fox in the snow" and not result.trimmed
    assert result.budget == 100 and "original prompt" in result.note

"""Pure: chat requests, conversation prompts, content mode, sfw masking and prompt budgets.

- Both request shapes the app has used (docs/APP_CONTRACT.md §5) parse into one :class:`Conversation`:
  ``messages`` (role/content) and the older ``{message, system_prompt, conversation_id,
  context_type, conversation_history: [{sender, content}]}``. History keeps the last
  :data:`MAX_HISTORY_TURNS` turns, each cut to :data:`MAX_TURN_CHARS` characters.
- :func:`detect_content_mode` picks the general or the unrestricted (adult) template from the
  words in ``content_mode.yaml``; ``sfw_mode`` forces general and :func:`mask_sfw` masks the reply.
- :func:`build_messages` fits system prompt + history + message into the context budget, counted
  with the model's real tokenizer through its chat template, dropping the oldest turns first.
- :func:`fit_prompt` fits an image/video prompt into its token budget (SDXL: 75 CLIP tokens with
  quality tags, WAN: 100), trimming at a sentence or comma boundary, never mid-word.

Templates and word lists live in ``bridge/data`` (:mod:`bridge.prompt_data`); tokenizers are passed
in (:func:`load_tokenizer` loads one from a model folder).
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bridge.limits import WholeNumber
from bridge.prompt_data import PromptData, Template, get_data
from bridge.safety import MINOR_RULE

MAX_HISTORY_TURNS = 20
MAX_TURN_CHARS = 2000
MAX_MESSAGE_CHARS = 32_000
#: Messages (and history turns) one request may carry; the context is trimmed to the model's window
#: anyway, this bounds the work of reading them (docs/API.md, "Limits").
MAX_MESSAGES = 200
CLIP_USABLE_TOKENS = 75  # CLIP reads 77 tokens, two of which are BOS and EOS
_USER_SENDERS = {"user", "human", "you", "me"}


class ChatRequestError(ValueError):
    """The request is malformed; the message names the field (the API answers 400)."""


class BudgetError(ValueError):
    """Even the system prompt does not fit the context budget."""


# ----------------------------------------------------------------------------- request shapes
class ChatMessage(BaseModel):
    """One message of the ``messages`` shape."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class HistoryTurn(BaseModel):
    """One turn of the older shape's ``conversation_history``; any sender but a user is the
    assistant side (``assistant``, ``character``, ``ai``, ...)."""

    model_config = ConfigDict(extra="ignore")

    sender: str = Field(min_length=1)
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class Turn(BaseModel):
    """One conversation turn after normalisation."""

    model_config = ConfigDict(frozen=True)

    role: Literal["user", "assistant"]
    content: str


class Conversation(BaseModel):
    """A request normalised: an optional system prompt and the turns, oldest first, the last one
    the user's current message. ``history_dropped`` / ``turns_truncated`` count what the
    20-turn / 2,000-character limits removed."""

    system_prompt: str | None = None
    turns: list[Turn] = Field(min_length=1)
    context_type: str | None = None
    conversation_id: str | None = None
    history_dropped: int = 0
    turns_truncated: int = 0

    @property
    def latest_user(self) -> str:
        return self.turns[-1].content

    @property
    def history(self) -> list[Turn]:
        return self.turns[:-1]


class ChatRequest(BaseModel):
    """``POST /chat``, ``/generate`` and ``/enhance`` bodies, in either shape. Sampling fields left
    out (None) take the template's defaults."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    message: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)
    system_prompt: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)
    conversation_id: str | None = None
    context_type: str | None = None
    conversation_history: list[HistoryTurn] | None = Field(None, max_length=MAX_MESSAGES)
    max_tokens: WholeNumber | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    model: Literal["qwen_instruct", "qwen_base"] = "qwen_instruct"
    sfw_mode: bool = False

    @field_validator("conversation_history", mode="before")
    @classmethod
    def _null_history(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _one_shape(self) -> "ChatRequest":
        if self.messages is None and self.message is None:
            raise ValueError("give either 'messages' or 'message'")
        if self.messages is not None and self.message is not None:
            raise ValueError("give either 'messages' or 'message', not both")
        if self.messages is not None:
            spoken = [m for m in self.messages if m.role != "system"]
            if not spoken:
                raise ValueError("messages: at least one user message is required")
            if spoken[-1].role != "user":
                raise ValueError("messages: the last non-system message must come from the user")
            if not spoken[-1].content.strip():
                raise ValueError("messages: the last user message is empty")
        elif not self.message.strip():  # type: ignore[union-attr]
            raise ValueError("message: must not be empty")
        return self

    def conversation(self) -> Conversation:
        """The request as one :class:`Conversation`, with the history limits applied."""
        if self.messages is not None:
            systems = [m.content.strip() for m in self.messages if m.role == "system" and m.content.strip()]
            turns = [Turn(role=m.role, content=m.content) for m in self.messages if m.role != "system"]  # type: ignore[arg-type]
            system = "\n\n".join(systems) or None
        else:
            turns = [Turn(role=_role_of(t.sender), content=t.content) for t in self.conversation_history or []]
            if turns and turns[-1].role == "user" and turns[-1].content.strip() == self.message.strip():  # type: ignore[union-attr]
                turns.pop()  # the app sometimes repeats the current message as the last history turn
            turns.append(Turn(role="user", content=self.message))  # type: ignore[arg-type]
            system = (self.system_prompt or "").strip() or None
        history, latest = turns[:-1], turns[-1]
        dropped = max(0, len(history) - MAX_HISTORY_TURNS)
        history = history[dropped:]
        cut = [_cut_chars(t.content, MAX_TURN_CHARS) for t in history]
        truncated = sum(1 for t, c in zip(history, cut) if c != t.content)
        history = [Turn(role=t.role, content=c) for t, c in zip(history, cut) if c.strip()]
        return Conversation(
            system_prompt=system,
            turns=[*history, latest],
            context_type=self.context_type,
            conversation_id=self.conversation_id,
            history_dropped=dropped,
            turns_truncated=truncated,
        )


def parse_chat_request(payload: Any) -> ChatRequest:
    """Validate a request body; :class:`ChatRequestError` names the field that is wrong."""
    if not isinstance(payload, dict):
        raise ChatRequestError("request body must be a JSON object")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise ChatRequestError("; ".join(problems)) from None


def _role_of(sender: str) -> Literal["user", "assistant"]:
    return "user" if sender.strip().lower() in _USER_SENDERS else "assistant"


def _cut_chars(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, at a word boundary when one is near the end."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ")
    return head[:space].rstrip() if space > limit * 0.8 else head


# ----------------------------------------------------------------------------- content mode
class ModeDecision(BaseModel):
    """Which template family applies, and why (reported in the response)."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["general", "unrestricted"]
    reason: str


def _phrase_regex(phrases: list[str]) -> re.Pattern[str] | None:
    """Whole-word, case-insensitive alternation of ``phrases`` (flexible spacing, plural "s")."""
    if not phrases:
        return None
    parts = sorted((r"\s+".join(map(re.escape, p.split())) for p in phrases), key=len, reverse=True)
    return re.compile(r"(?<!\w)(" + "|".join(parts) + r")(?:e?s)?(?!\w)", re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def _cached_regex(phrases: tuple[str, ...]) -> re.Pattern[str] | None:
    return _phrase_regex(list(phrases))


def detect_content_mode(conversation: Conversation, sfw_mode: bool, data: PromptData | None = None) -> ModeDecision:
    """General or unrestricted, from ``content_mode.yaml``: the context type, trigger phrases,
    then adult keywords, read in the system prompt and the most recent user turns. ``sfw_mode``
    always means general. (The safety gate applies in every mode.)"""
    if sfw_mode:
        return ModeDecision(mode="general", reason="sfw_mode is on")
    rules = (data or get_data()).content_mode
    context_type = (conversation.context_type or "").strip().lower()
    if context_type and context_type in {c.lower() for c in rules.unrestricted_context_types}:
        return ModeDecision(mode="unrestricted", reason=f"context_type '{context_type}'")
    recent = [t.content for t in conversation.turns[-rules.scan_turns :] if t.role == "user"]
    texts = [conversation.system_prompt or "", *recent]
    triggers = _cached_regex(tuple(rules.trigger_phrases))
    for text in texts:
        match = triggers.search(text) if triggers else None
        if match:
            return ModeDecision(mode="unrestricted", reason=f"trigger phrase '{_plain(match.group(1))}'")
    keywords = _cached_regex(tuple(rules.keywords))
    found = sorted({_plain(m.group(1)) for text in texts for m in keywords.finditer(text)}) if keywords else []
    if len(found) >= rules.keyword_threshold:
        return ModeDecision(mode="unrestricted", reason=f"adult keywords: {', '.join(found)}")
    return ModeDecision(mode="general", reason="no adult-content signals")


def _plain(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def mask_sfw(text: str, data: PromptData | None = None) -> str:
    """Replace each word of the sfw mask list (whole word, any case, plural too) in ``text``."""
    mask = (data or get_data()).content_mode.sfw_mask
    pattern = _cached_regex(tuple(mask.words))
    return pattern.sub(mask.replacement, text) if pattern else text


def template_name(conversation: Conversation, decision: ModeDecision, data: PromptData | None = None) -> str:
    """The template for a chat: ``admin`` stays admin; unrestricted mode gives ``unrestricted``;
    otherwise the older shape's ``context_type`` decides (default ``chat``)."""
    name = (data or get_data()).templates.for_context_type(conversation.context_type)
    if name != "admin" and decision.mode == "unrestricted":
        return "unrestricted"
    return name


def system_prompt_for(conversation: Conversation, template: Template, sfw_mode: bool = False) -> str:
    """The request's own system prompt when it has one, else the template's. ``sfw_mode`` keeps the
    caller's own prompt too (the app's sfw tier sends its own, as the old worker kept it): sfw
    mode filters the reply (:func:`mask_sfw`), not the instructions. A caller's own prompt ends
    with the safety gate's rule about minors (:data:`bridge.safety.MINOR_RULE`): it replaces the
    template's."""
    own = conversation.system_prompt
    if not own:
        return template.system
    return with_minor_rule(own)


def with_minor_rule(system: str) -> str:
    """A caller's own system prompt as the model gets it: the safety gate's rule about minors after it."""
    return f"{system}\n\n{MINOR_RULE}"


# ----------------------------------------------------------------------------- token counting
def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens ``text`` takes, without special tokens (for CLIP: without BOS/EOS)."""
    if not text:
        return 0
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def usable_tokens(tokenizer: Any) -> int:
    """Prompt tokens a text encoder reads: CLIP 77 - BOS - EOS = 75; others their model maximum."""
    if "clip" in type(tokenizer).__name__.lower():
        return min(CLIP_USABLE_TOKENS, int(tokenizer.model_max_length) - 2)
    return int(tokenizer.model_max_length)


def count_chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Prompt tokens of ``messages`` as the model sees them: the chat template with the generation
    prompt (model_kit.llm renders it the same way)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a tokenizer without a chat template: a plain role-prefixed transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return count_tokens(tokenizer, text)


def _context_limit(tokenizer: Any, context_tokens: int) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    return min(context_tokens, int(limit)) if isinstance(limit, int) and 0 < limit < 10**7 else context_tokens


@functools.lru_cache(maxsize=16)
def _load_tokenizer_cached(path: str) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy; only when a tokenizer is needed

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_tokenizer(model_dir: Path | str) -> Any:
    """The tokenizer in ``model_dir``: a tokenizer folder (e.g. ``sdxl-base-config/tokenizer``), a
    model folder, or a Hugging Face cache folder (its snapshot is resolved). Cached per folder."""
    path = Path(model_dir)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from model_kit.common import resolve_hf_folder  # noqa: PLC0415

        path = resolve_hf_folder(path)
    with _tokenizer_load_lock:  # first loads at once from threads: transformers' lazy import is not thread-safe
        return _load_tokenizer_cached(str(path.resolve()))


_tokenizer_load_lock = threading.Lock()


# ----------------------------------------------------------------------------- context budget
@dataclass(frozen=True)
class BuiltMessages:
    """What :func:`build_messages` made. Unpacks as ``(messages, trimmed, dropped_turns)``."""

    messages: list[dict[str, str]]
    trimmed: bool
    dropped_turns: int
    prompt_tokens: int
    user_message_trimmed: bool = False

    def __iter__(self):
        return iter((self.messages, self.trimmed, self.dropped_turns))


def build_messages(
    conversation: Conversation,
    template: Template,
    tokenizer: Any,
    context_tokens: int | None = None,
    max_new_tokens: int | None = None,
    *,
    system_prompt: str | None = None,
) -> BuiltMessages:
    """Messages for the model within ``context_tokens - max_new_tokens`` prompt tokens.

    The oldest history turns go first; the system prompt and the latest user message stay. If
    even those do not fit, the start of the latest user message is cut (``user_message_trimmed``).
    Defaults: the template's ``context_tokens`` (capped by the tokenizer's maximum) and
    ``max_tokens``; ``system_prompt`` defaults to :func:`system_prompt_for`.
    """
    context = _context_limit(tokenizer, context_tokens or template.context_tokens)
    new_tokens = max_new_tokens or template.max_tokens
    budget = context - new_tokens
    if budget <= 0:
        raise BudgetError(f"max_tokens ({new_tokens}) leaves no room for the prompt in {context} context tokens")
    system = {"role": "system", "content": system_prompt or system_prompt_for(conversation, template)}
    history = [{"role": t.role, "content": t.content} for t in conversation.history]
    latest = {"role": "user", "content": conversation.latest_user}

    def count(drop: int) -> int:
        return count_chat_tokens(tokenizer, [system, *history[drop:], latest])

    tokens = count(0)
    if tokens <= budget:
        return BuiltMessages([system, *history, latest], trimmed=False, dropped_turns=0, prompt_tokens=tokens)
    low, high = 1, len(history)  # find the fewest oldest turns to drop
    while low < high:
        mid = (low + high) // 2
        if count(mid) <= budget:
            high = mid
        else:
            low = mid + 1
    if history and (tokens := count(low)) <= budget:
        return BuiltMessages([system, *history[low:], latest], trimmed=True, dropped_turns=low, prompt_tokens=tokens)
    content, tokens = _fit_latest(tokenizer, system, latest["content"], budget)
    messages = [system, {"role": "user", "content": content}]
    return BuiltMessages(messages, trimmed=True, dropped_turns=len(history), prompt_tokens=tokens, user_message_trimmed=True)


def _fit_latest(tokenizer: Any, system: dict[str, str], content: str, budget: int) -> tuple[str, int]:
    """The end of ``content`` that fits beside ``system`` in ``budget`` tokens, starting at a word."""
    overhead = count_chat_tokens(tokenizer, [system, {"role": "user", "content": ""}])
    if overhead >= budget:
        raise BudgetError(f"the system prompt alone takes {overhead} tokens, over the prompt budget of {budget}")
    ids = tokenizer(content, add_special_tokens=False, verbose=False)["input_ids"]
    keep = budget - overhead
    while keep > 0:
        tail = tokenizer.decode(ids[-keep:], skip_special_tokens=True)
        tail = tail.lstrip("\ufffd")
        space = re.search(r"\s", tail)
        if space and len(ids) > keep:
            tail = tail[space.end() :]  # drop the partial first word
        tail = tail.strip()
        tokens = count_chat_tokens(tokenizer, [system, {"role": "user", "content": tail}])
        if tokens <= budget and tail:
            return tail, tokens
        keep -= max(1, tokens - budget)
    raise BudgetError(f"the latest message cannot fit in the prompt budget of {budget} tokens")


# ----------------------------------------------------------------------------- prompt budgets
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_CLAUSE_END = re.compile(r"[,;](?=\s|$)")


def fit_prompt(
    text: str, tokenizer: Any, budget: int, quality_tags: list[str] | None = None
) -> tuple[str, bool]:
    """``text`` (with ``quality_tags`` in front, those not already in it) within ``budget``
    tokens of ``tokenizer`` (special tokens not counted: for CLIP, 75 of its 77).

    An over-long prompt is cut at the last sentence or comma boundary that fits, never mid-word
    (a single over-long clause falls back to a word boundary). Returns ``(prompt, trimmed)``.
    """
    text = re.sub(r"\s+", " ", text or "").strip().strip(",; ")
    present = {part.strip().lower() for part in text.split(",")}
    wanted = [tag.strip() for tag in quality_tags or [] if tag.strip() and tag.strip().lower() not in present]
    tags = list(wanted)
    tag_text = ", ".join(tags)
    while tags and count_tokens(tokenizer, tag_text) > budget:  # tags alone too long: fewer tags
        tags.pop()
        tag_text = ", ".join(tags)

    def assemble(body: str) -> str:
        return ", ".join(part for part in (tag_text, body) if part)

    def fits(body: str) -> bool:
        return count_tokens(tokenizer, assemble(body)) <= budget

    if fits(text):
        return assemble(text), len(tags) < len(wanted)
    for cut in _boundary_prefixes(text):
        if fits(cut):
            return assemble(cut), True
    for cut in _word_prefixes(text):
        if fits(cut):
            return assemble(cut), True
    return tag_text, True


def _boundary_prefixes(text: str) -> list[str]:
    """Prefixes ending at a sentence or clause boundary, longest first."""
    ends = {m.end() for m in _SENTENCE_END.finditer(text)} | {m.start() for m in _CLAUSE_END.finditer(text)}
    prefixes = [text[:end].rstrip(",; ").strip() for end in sorted(ends, reverse=True) if end < len(text)]
    return [p for p in dict.fromkeys(prefixes) if p]


def _word_prefixes(text: str) -> list[str]:
    """Prefixes ending at a word boundary, longest first (the last resort)."""
    words = text.split(" ")
    return [" ".join(words[:n]).rstrip(",;: ") for n in range(len(words) - 1, 0, -1)]


# ----------------------------------------------------------------------------- enhancement
EnhanceKind = Literal["sdxl", "wan"]
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:enhanced|improved|rewritten|final)?\s*(?:video\s+|image\s+)?prompt\s*(?:\*\*)?\s*:\s*", re.I)


def enhancement_messages(kind: EnhanceKind, prompt: str, data: PromptData | None = None) -> list[dict[str, str]]:
    """Chat messages asking the LLM to enhance ``prompt`` for SDXL or WAN."""
    template = (data or get_data()).template(f"{kind}_enhance")
    return [
        {"role": "system", "content": template.system},
        {"role": "user", "content": template.user.replace("{prompt}", prompt.strip())},
    ]


@dataclass(frozen=True)
class EnhancedPrompt:
    """A finished enhancement and its metadata (``metadata()`` goes into the job's metadata)."""

    prompt: str
    original: str
    trimmed: bool
    fell_back: bool
    tokens: int
    budget: int
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "original_prompt": self.original,
            "enhanced_prompt": self.prompt,
            "enhancement_fell_back": self.fell_back,
            "prompt_trimmed": self.trimmed,
            "prompt_tokens": self.tokens,
            "prompt_budget": self.budget,
            **({"enhancement_note": self.note} if self.note else {}),
        }


def clean_enhancement(raw: str) -> str:
    """The model's answer as one prompt line: no labels, quotes, code fences or line breaks."""
    text = re.sub(r"```[a-z]*", "", raw or "").strip()
    text = _LABEL.sub("", text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def finish_enhancement(
    kind: EnhanceKind, raw_output: str | None, tokenizer: Any, *, original: str, data: PromptData | None = None
) -> EnhancedPrompt:
    """Clean the LLM's answer and fit it (quality tags for SDXL, when configured) into the
    template's ``prompt_budget``; an empty answer falls back to ``original``."""
    template = (data or get_data()).template(f"{kind}_enhance")
    budget = template.prompt_budget or usable_tokens(tokenizer)
    cleaned = clean_enhancement(raw_output or "")
    fell_back = not cleaned
    prompt, trimmed = fit_prompt(cleaned or original, tokenizer, budget, template.quality_tags or None)
    note = "the model returned no usable text; the original prompt was used" if fell_back else None
    if trimmed:
        note = (note + "; " if note else "") + f"trimmed to {budget} tokens at a sentence or comma boundary"
    return EnhancedPrompt(prompt, original, trimmed, fell_back, count_tokens(tokenizer, prompt), budget, note)


# ----------------------------------------------------------------------------- one chat turn
@dataclass(frozen=True)
class PreparedChat:
    """Everything the API needs to run one chat request on a qwen model."""

    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    mode: ModeDecision
    template: str
    sfw_mode: bool
    built: BuiltMessages
    conversation: Conversation

    def metadata(self) -> dict[str, Any]:
        """What the response reports about the prompt (content mode, template, trimming)."""
        return {
            "content_mode": self.mode.mode,
            "content_mode_reason": self.mode.reason,
            "template": self.template,
            "sfw_mode": self.sfw_mode,
            "prompt_tokens": self.built.prompt_tokens,
            "context_trimmed": self.built.trimmed,
            "dropped_turns": self.built.dropped_turns,
            "user_message_trimmed": self.built.user_message_trimmed,
            "history_dropped_over_limit": self.conversation.history_dropped,
            "turns_truncated_over_limit": self.conversation.turns_truncated,
        }

    def finish(self, reply: str, data: PromptData | None = None) -> str:
        """The model's reply as the user gets it: masked when ``sfw_mode`` is on."""
        return mask_sfw(reply, data) if self.sfw_mode else reply


def prepare_chat(
    request: ChatRequest, tokenizer: Any, *, context_tokens: int | None = None, data: PromptData | None = None,
    template: str | None = None,
) -> PreparedChat:
    """Conversation, content mode, template, trimmed messages and sampling for one request.

    ``template`` forces a template (a job type such as ``chat_unrestricted`` or ``admin_utilities``);
    ``sfw_mode`` still wins over a forced unrestricted template.
    """
    data = data or get_data()
    conversation = request.conversation()
    decision = detect_content_mode(conversation, request.sfw_mode, data)
    if template is not None and not (request.sfw_mode and template == "unrestricted"):
        mode = "unrestricted" if template == "unrestricted" else "general"
        decision = ModeDecision(mode=mode, reason=f"template {template!r} forced by the request type")
    name = "chat" if request.sfw_mode else (template or template_name(conversation, decision, data))
    template = data.template(name)
    sampling = template.sampling(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p)
    built = build_messages(
        conversation,
        template,
        tokenizer,
        context_tokens,
        sampling["max_tokens"],
        system_prompt=system_prompt_for(conversation, template, request.sfw_mode),
    )
    return PreparedChat(built.messages, sampling, decision, name, request.sfw_mode, built, conversation)

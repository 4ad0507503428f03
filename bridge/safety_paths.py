"""Pure: which texts go through the safety gate together, for each way into a model
(docs/ARCHITECTURE.md, "Content-safety gate").

A model sees a job's or a request's texts together, so the gate checks them as one unit: an image
or video job's prompt with its compel weights (the model appends them) and its negative prompt
(:func:`bridge.safety.check_image_prompt`); a chat's system prompt (the caller's or the legacy
``system_prompt``), every history turn and the last turn; a chat-queue job's prompt with its chat.
"""

from __future__ import annotations

from typing import Any

from bridge.prompt_data import PromptData
from bridge.safety import SafetyVerdict, check_image_prompt, check_texts


def chat_texts(chat: Any) -> list[str]:
    """Every text of a :class:`bridge.chat.ChatRequest` that reaches the model: the system prompt
    (the caller's ``system`` messages or the legacy ``system_prompt``), the history after its
    limits (what the model is sent) and the last turn."""
    conversation = chat.conversation()
    texts = [conversation.system_prompt or "", *(turn.content for turn in conversation.turns)]
    return [text for text in texts if text]


def job_texts(job: Any) -> list[str]:
    """Every text of a job that reaches a model (for a chat-queue job, its chat too)."""
    texts = [job.prompt, job.compel_weights or ""]
    if job.chat is not None:
        texts += chat_texts(job.chat)
    return [text for text in dict.fromkeys(texts) if text]


def job_verdict(job: Any, data: PromptData | None = None) -> SafetyVerdict:
    """The gate's verdict on everything a job sends to its models, whatever its queue or type."""
    if job.type.output == "text":
        return check_texts(*job_texts(job), data=data)
    return check_image_prompt(job.prompt, job.compel_weights, job.negative_prompt, data=data)

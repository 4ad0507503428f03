"""Pure: the content-safety gate every prompt passes before any generation.

It refuses sexual content involving minors: a prompt is refused when a *minor* signal (a term from
``safety_terms.yaml``, a minor pattern, or an age under 18 read by an age pattern) appears together
with a *sexual* signal. Either signal alone passes ("kid's birthday party", "nude beach at dawn").

Matching runs on several normalised views of the text, so common obfuscations do not slip through:
Unicode NFKC, case folding, zero-width characters and accents removed, homoglyphs mapped, leetspeak
mapped inside words ("k1d"), single letters joined across separators ("k i d", "m.i.n.o.r"),
separators inside words removed ("ch-ild"), and repeated letters accepted ("kiiid").

There is deliberately no parameter, mode or setting that turns the gate off. The reason given is
clear and non-graphic; callers count refusals in their metrics.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from bridge.prompt_data import AGE_PLACEHOLDER, PromptData, SafetyTermsFile, get_data

MIN_ADULT_AGE = 18
REFUSAL_REASON = "refused: the prompt combines sexual content with a reference to a minor"
# Invisible characters deleted before matching (zero-width, joiners, direction marks, soft hyphen).
_ZERO_WIDTH = dict.fromkeys(
    map(
        ord,
        "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f"
        "\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff",
    )
)


_REPEATS = re.compile(r"(.)\1{2,}", re.DOTALL)


class SafetyVerdict(BaseModel):
    """The gate's answer. ``category`` is ``"sexual_minor"`` when refused, else ``"ok"``."""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    reason: str | None = None
    category: Literal["ok", "sexual_minor"] = "ok"


class PromptRefused(ValueError):
    """A prompt did not pass the safety gate; ``str(exc)`` is the non-graphic reason."""

    def __init__(self, verdict: SafetyVerdict) -> None:
        super().__init__(verdict.reason or REFUSAL_REASON)
        self.verdict = verdict


def check_prompt(text: str, *, data: PromptData | None = None) -> SafetyVerdict:
    """Check one prompt. ``data`` only chooses where the term lists come from (default: the
    cached ``DATA_DIR`` files, whose safety list always includes the packaged one)."""
    if not isinstance(text, str):
        raise TypeError(f"check_prompt expects text, got {type(text).__name__}")
    minor, sexual = _matcher((data or get_data()).safety).signals(text)
    if minor and sexual:
        return SafetyVerdict(allowed=False, reason=REFUSAL_REASON, category="sexual_minor")
    return SafetyVerdict(allowed=True)


def ensure_allowed(*texts: str | None, data: PromptData | None = None) -> None:
    """Check ``texts`` together (one combined prompt); raise :class:`PromptRefused` if refused."""
    combined = "\n".join(text for text in texts if text)
    verdict = check_prompt(combined, data=data)
    if not verdict.allowed:
        raise PromptRefused(verdict)


def normalise(text: str, data: PromptData | None = None) -> list[str]:
    """The views of ``text`` the gate matches on (exposed for tests and debugging)."""
    return _matcher((data or get_data()).safety).views(text)


# ----------------------------------------------------------------------------- compiled matcher
_compiled: dict[int, tuple[SafetyTermsFile, "_Matcher"]] = {}


def _matcher(terms: SafetyTermsFile) -> "_Matcher":
    """One compiled matcher per term list (term lists are immutable)."""
    entry = _compiled.get(id(terms))
    if entry is None or entry[0] is not terms:
        if len(_compiled) > 16:
            _compiled.clear()
        entry = (terms, _Matcher(terms))
        _compiled[id(terms)] = entry
    return entry[1]


def _term_pattern(term: str, allow_plural: bool = True) -> str:
    """A term as a regex: letters may repeat ("kiiid"), words may be joined by any separators or
    none ("high-school", "highschool"), and an optional plural ending. Quantifiers are possessive
    (a run of one letter is taken whole, never backtracked into), so matching stays linear."""
    words = []
    for word in re.split(r"[\W_]+", term.casefold()):
        if not word:
            continue
        parts = []
        for run in re.finditer(r"(.)\1*", word):
            char, count = re.escape(run.group(1)), min(len(run.group(0)), 2)  # text runs are cut to 2
            if not run.group(1).isalpha():
                parts.append(char * count)
            else:
                parts.append(f"{char}++" if count == 1 else f"{char}{{{count},}}+")
        words.append("".join(parts))
    body = r"[\W_]*+".join(words)
    return body + (r"(?:e?s)?+" if allow_plural else "")


def _alternation(terms: list[str], allow_plural: bool = True) -> re.Pattern[str]:
    parts = sorted({_term_pattern(term, allow_plural) for term in terms}, key=len, reverse=True)
    return re.compile(r"(?<![^\W\d_])(?:" + "|".join(parts) + r")(?![^\W\d_])")


def _substrings(terms: list[str]) -> re.Pattern[str]:
    """Terms found anywhere (no word edges), for letters joined from a spaced-out run."""
    return re.compile("|".join(sorted((_term_pattern(term, False) for term in terms), key=len, reverse=True)))


@dataclass
class _Matcher:
    """The compiled form of one :class:`SafetyTermsFile`."""

    terms: SafetyTermsFile

    def __post_init__(self) -> None:
        terms = self.terms
        self.minor_re = _alternation(terms.minor_terms)
        self.sexual_re = _alternation(terms.sexual_terms)
        # Substring forms for letters joined from "k i d"-style runs (their word edges are unknown).
        self.minor_sub_re = _substrings(terms.minor_terms)
        self.sexual_sub_re = _substrings(terms.sexual_terms)
        self.allowed_re = _alternation(terms.allowed_phrases, allow_plural=False) if terms.allowed_phrases else None
        age = self._age_regex(terms.number_words)
        self.age_res = [re.compile(p.replace(AGE_PLACEHOLDER, age)) for p in terms.age_patterns]
        self.minor_pattern_res = [re.compile(p) for p in terms.minor_patterns]
        self.homoglyphs = str.maketrans({k: v for k, v in terms.homoglyphs.items()})
        self.leet = str.maketrans({k: v for k, v in terms.leetspeak.items()})
        leet_chars = re.escape("".join(terms.leetspeak))
        self.leet_token_re = re.compile(rf"[\w{leet_chars}]+")
        seps = "".join(dict.fromkeys(terms.separators + " \t\n"))
        sep_class = "[" + re.escape(seps) + "]+"
        unit = rf"[^\W_]|[{leet_chars}]" if leet_chars else r"[^\W_]"
        self.spaced_run_re = re.compile(rf"(?<![^\W_])(?:{unit})(?:{sep_class}(?:{unit})){{2,}}(?![^\W_])")
        self.sep_strip_re = re.compile(sep_class)
        inner = "".join(ch for ch in seps if not ch.isspace())
        self.inner_sep_re = re.compile(rf"(?<=[^\W\d_])[{re.escape(inner)}]+(?=[^\W\d_])") if inner else None

    # ------------------------------------------------------------------ normalisation
    @staticmethod
    def _age_regex(number_words: dict[str, int]) -> str:
        """The ``{AGE}`` group: digits, a number word, or tens + unit ("twenty one")."""
        tens = sorted((w for w, v in number_words.items() if v >= 20 and v % 10 == 0), key=len, reverse=True)
        units = sorted((w for w, v in number_words.items() if 0 < v < 20), key=len, reverse=True)
        alternatives = [r"(?<![\d.])\d{1,3}(?!\d)"]
        if tens and units:
            alternatives.append(rf"\b(?:{'|'.join(map(re.escape, tens))})[\s-]*(?:{'|'.join(map(re.escape, units))})\b")
        if number_words:
            every = sorted(number_words, key=len, reverse=True)
            alternatives.append(rf"\b(?:{'|'.join(map(re.escape, every))})\b")
        return "(?P<age>" + "|".join(alternatives) + ")"

    def _base(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).casefold()
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
        text = unicodedata.normalize("NFC", text).translate(self.homoglyphs)
        return _REPEATS.sub(r"\1\1", text)  # "kiiiid" -> "kiid": terms accept any repeat count

    def _deleet(self, text: str) -> str:
        def swap(match: re.Match[str]) -> str:
            token = match.group(0)
            return token.translate(self.leet) if any(ch.isalpha() for ch in token) else token

        return self.leet_token_re.sub(swap, text)

    def _joined(self, text: str) -> tuple[str, list[str]]:
        """Spaced single letters joined ("k i d" -> "kid") and separators inside words removed."""
        runs: list[str] = []

        def join(match: re.Match[str]) -> str:
            run = _REPEATS.sub(r"\1\1", self.sep_strip_re.sub("", match.group(0)))
            runs.append(run)
            return f" {run} "

        joined = self.spaced_run_re.sub(join, text)
        if self.inner_sep_re is not None:
            joined = self.inner_sep_re.sub("", joined)
        return _REPEATS.sub(r"\1\1", joined), runs

    def views(self, text: str) -> list[str]:
        base = self._base(text)
        joined, _ = self._joined(base)
        return list(dict.fromkeys([base, self._deleet(base), joined, self._deleet(joined)]))

    def _views_and_runs(self, text: str) -> tuple[list[str], list[str]]:
        base = self._base(text)
        joined, runs = self._joined(base)
        deleet_joined, leet_runs = self._joined(self._deleet(base))
        views = list(dict.fromkeys([base, self._deleet(base), joined, self._deleet(joined), deleet_joined]))
        all_runs = list(dict.fromkeys([*runs, *(self._deleet(r) for r in runs), *leet_runs]))
        return views, all_runs

    # ------------------------------------------------------------------ signals
    def _blank_allowed(self, view: str) -> str:
        if self.allowed_re is None:
            return view
        return self.allowed_re.sub(lambda m: " " * len(m.group(0)), view)

    def signals(self, text: str) -> tuple[bool, bool]:
        """(minor signal, sexual signal) found in any view of ``text``."""
        views, runs = self._views_and_runs(text)
        sexual = any(self.sexual_re.search(view) for view in views) or any(
            self.sexual_sub_re.search(run) for run in runs
        )
        minor = any(self._minor_in_view(view) for view in views) or any(self.minor_sub_re.search(run) for run in runs)
        return minor, sexual

    def _minor_in_view(self, view: str) -> bool:
        return bool(
            self.minor_re.search(self._blank_allowed(view))
            or any(pattern.search(view) for pattern in self.minor_pattern_res)
            or self._has_minor_age(view)
        )

    def _has_minor_age(self, view: str) -> bool:
        for pattern in self.age_res:
            for match in pattern.finditer(view):
                age = self._read_age(match.group("age"))
                if age is not None and age < MIN_ADULT_AGE:
                    return True
        return False

    def _read_age(self, raw: str | None) -> int | None:
        if not raw:
            return None
        raw = raw.strip()
        if raw.isdigit():
            return int(raw)
        words = [word for word in re.split(r"[\s-]+", raw) if word]
        values = [self.terms.number_words.get(word) for word in words]
        if not values or any(value is None for value in values):
            return None
        return sum(values)  # type: ignore[arg-type]

"""Pure: the content-safety gate every text passes on its way into and out of a model.

It refuses sexual content involving minors: a text is refused when a *minor* signal (a minor term,
a minor pattern, or a person's age under 18) appears together with a *sexual* signal, anywhere in
the text (the unit a caller checks is everything the model will see together). Either alone
passes ("kid's birthday party", "nude beach at dawn").

How the gate reads text (docs/ARCHITECTURE.md, "Content-safety gate"):

- every text is read as itself and as what it may hide (base64 and hex runs decoded, rot13, reversed;
  :func:`bridge.safety_text.decodings`), each folded by :func:`bridge.safety_text.fold` (Unicode
  confusables, invisible characters, accents, case);
- each reading is matched in several views: as written, leetspeak mapped inside words ("k1d"),
  single letters joined across separators ("k i d", "m.i.n.o.r"), and compounds split into the
  gate's own words ("nudechild", "sexyteengirl");
- phrases that use a minor or sexual word in another sense ("minor league", "with the naked eye",
  "mom of 3 kids", "child-free") are blanked first, and an age next to an object ("whisky aged 12
  years") is no person's age.

The vocabulary is built in (:mod:`bridge.safety_terms`, in several languages); the operator's
``safety_terms.yaml`` can only add to it (:mod:`bridge.prompt_data` refuses a file that would
remap letters or exempt text). There is deliberately no parameter, mode or setting that turns the
gate off. The reason given is clear and never names what matched.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict

from bridge import safety_terms as builtin
from bridge.prompt_data import AGE_PLACEHOLDER, PromptData, SafetyTermsFile, get_data
from bridge.safety_text import decodings, fold, split_camel

MIN_ADULT_AGE = 18
REFUSAL_REASON = "refused for safety: the request combines sexual content with a reference to a minor"
#: Appended to a caller's own system prompt, which replaces the template's (and its rule about minors).
MINOR_RULE = "Whatever else is said here: never write sexual content involving anyone under 18."
OUTPUT_REFUSAL_REASON = "refused for safety: the model's answer combined sexual content with a reference to a minor"
#: Leetspeak read inside words that hold a letter ("k1d" → "kid"; a bare "15" stays a number).
LEETSPEAK = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s",
             "!": "i", "|": "l", "+": "t", "€": "e", "£": "l", "¡": "i", "ø": "o", "(": "c", "#": "h"}
#: Characters that may sit between single letters to hide a word ("m.i.n.o.r", "k i d", "k-i-d").
SEPARATORS = " .-_*~|/\\,:;'`\"+·•=^"
#: Texts (and their characters in all) whose signals a matcher remembers (:meth:`_Matcher.signals`).
RECENT_TEXTS = 64
RECENT_CHARS = 2_000_000
_REPEATS = re.compile(r"(.)\1{2,}", re.DOTALL)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]")


class SafetyVerdict(BaseModel):
    """The gate's answer. ``category`` is ``"sexual_minor"`` when refused, else ``"ok"``."""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    reason: str | None = None
    category: Literal["ok", "sexual_minor"] = "ok"


class PromptRefused(ValueError):
    """A text did not pass the safety gate; ``str(exc)`` is the non-graphic reason."""

    def __init__(self, verdict: SafetyVerdict) -> None:
        super().__init__(verdict.reason or REFUSAL_REASON)
        self.verdict = verdict


_ALLOWED = SafetyVerdict(allowed=True)
_REFUSED = SafetyVerdict(allowed=False, reason=REFUSAL_REASON, category="sexual_minor")
_REFUSED_OUTPUT = SafetyVerdict(allowed=False, reason=OUTPUT_REFUSAL_REASON, category="sexual_minor")


# ----------------------------------------------------------------------------- the public gate
def check_prompt(text: str, *, data: PromptData | None = None) -> SafetyVerdict:
    """Check one text (everything a model will see together). ``data`` only chooses where the
    operator's additions come from (default: the cached ``DATA_DIR`` files)."""
    if not isinstance(text, str):
        raise TypeError(f"check_prompt expects text, got {type(text).__name__}")
    minor, sexual = signals(text, data=data)
    return _REFUSED if minor and sexual else _ALLOWED


def check_texts(*texts: str | None, data: PromptData | None = None) -> SafetyVerdict:
    """Check ``texts`` as one unit (a prompt and its weights, every message of a chat)."""
    return check_prompt("\n".join(text for text in texts if text), data=data)


def check_image_prompt(prompt: str, compel_weights: str | None = None, negative_prompt: str | None = None,
                       *, data: PromptData | None = None) -> SafetyVerdict:
    """An image or video request: the prompt and its compel weights as one unit (the model joins
    them), and a negative prompt that steers a sexual picture away from adulthood ("adult, mature")
    counts as a minor signal. A negative prompt's own minor words ("child, underage") are the
    caller keeping minors out, never a signal."""
    positive = "\n".join(text for text in (prompt, compel_weights) if text)
    minor, sexual = signals(positive, data=data)
    if sexual and not minor and negative_prompt:
        minor = _matcher(data).steers_young(negative_prompt)
    return _REFUSED if minor and sexual else _ALLOWED


def check_output(answer: str, *context: str | None, data: PromptData | None = None) -> SafetyVerdict:
    """A model's answer: refused when it combines the two signals itself, or when it brings the
    sexual signal to a context (the request that produced it) that holds the minor one. A
    context's sexual words beside an answer's incidental "children" are not combined: answers
    often say what is unsuitable for children."""
    minor, sexual = signals(answer, data=data)
    if sexual and not minor and any(context):
        minor = signals("\n".join(c for c in context if c), data=data)[0]
    return _REFUSED_OUTPUT if minor and sexual else _ALLOWED


def ensure_allowed(*texts: str | None, data: PromptData | None = None) -> None:
    """Check ``texts`` together (one combined prompt); raise :class:`PromptRefused` if refused."""
    verdict = check_texts(*texts, data=data)
    if not verdict.allowed:
        raise PromptRefused(verdict)


def signals(text: str, *, data: PromptData | None = None) -> tuple[bool, bool]:
    """(minor signal, sexual signal) anywhere in ``text``."""
    return _matcher(data).signals(text)


def normalise(text: str, data: PromptData | None = None) -> list[str]:
    """The views of ``text`` the gate matches on (exposed for tests and debugging)."""
    return _matcher(data).views(text)


class StreamGuard:
    """Watches an answer as it is generated: :meth:`feed` each delta and send what it returns;
    ``refused`` turns true (and nothing more is returned) once the answer so far, with its
    ``context``, does not pass :func:`check_output`. Text is released only after it was checked,
    in steps of at least ``step`` characters (default: every delta, so a stream stays as
    incremental as the model); :meth:`flush` checks and releases the rest. Each check reads only
    the text since the last one plus ``overlap`` characters (signals seen earlier are remembered),
    so a long answer costs a bounded amount per step."""

    def __init__(self, *context: str | None, data: PromptData | None = None, step: int = 1,
                 overlap: int = 160) -> None:
        self._matcher = _matcher(data)
        joined = "\n".join(c for c in context if c)
        self._context_minor = bool(joined) and self._matcher.signals(joined)[0]
        self._text, self._checked, self._step, self._overlap = "", 0, step, overlap
        self._minor = self._sexual = False
        self.refused = False

    def feed(self, delta: str) -> str:
        if self.refused:
            return ""
        self._text += delta
        return self._release() if len(self._text) - self._checked >= self._step else ""

    def flush(self) -> str:
        return "" if self.refused else self._release()

    def _release(self) -> str:
        window = self._text[max(0, self._checked - self._overlap):]
        minor, sexual = self._matcher.read(window)  # each window once: nothing to remember
        self._minor, self._sexual = self._minor or minor, self._sexual or sexual
        if self._sexual and (self._minor or self._context_minor):
            self.refused = True
            return ""
        out, self._checked = self._text[self._checked:], len(self._text)
        return out


# ----------------------------------------------------------------------------- compiled matcher
_compiled: dict[int, tuple[SafetyTermsFile, "_Matcher"]] = {}


def _matcher(data: PromptData | None) -> "_Matcher":
    """One compiled matcher per operator term list (term lists are immutable)."""
    terms = (data or get_data()).safety
    entry = _compiled.get(id(terms))
    if entry is None or entry[0] is not terms:
        if len(_compiled) > 16:
            _compiled.clear()
        entry = (terms, _Matcher(terms))
        _compiled[id(terms)] = entry
    return entry[1]


def _term_pattern(term: str) -> str:
    """A folded term as a regex: letters may repeat ("kiiid"), words may be joined by separators
    or none ("high-school", "highschool"), a trailing ``*`` takes any word ending. A repeat is of
    one letter, so backtracking stays bounded."""
    stem = term.endswith("*")
    words = []
    for word in re.split(r"[\W_]+", fold(term.rstrip("*"))):
        if not word:
            continue
        parts = []
        for run in re.finditer(r"(.)\1*", word):
            char, count = re.escape(run.group(1)), min(len(run.group(0)), 2)
            if not run.group(1).isalpha() or _CJK.match(run.group(1)):
                parts.append(char * count)
            else:
                # (greedy, not possessive: "younggirl" needs the g of "young" given back to "girl")
                parts.append(f"{char}+" if count == 1 else f"{char}{{{count},}}")
        words.append("".join(parts))
    body = r"[\W_]*+".join(words)
    return body + (r"[^\W_]*+" if stem else r"(?:e?s)?+")


def _alternation(terms: Iterable[str]) -> re.Pattern[str]:
    """Latin-script terms as whole words; terms in scripts without spaces anywhere."""
    terms = [t for t in dict.fromkeys(terms) if fold(t.rstrip("*")).strip()]
    words = sorted({_term_pattern(t) for t in terms if not _CJK.search(t)}, key=len, reverse=True)
    anywhere = sorted({re.escape(fold(t)) for t in terms if _CJK.search(t)}, key=len, reverse=True)
    parts = [r"(?<![^\W\d_])(?:" + "|".join(_by_first_letter(words)) + r")(?![^\W\d_])"]
    if anywhere:
        parts.append("|".join(anywhere))
    return re.compile("|".join(parts))


_FIRST_LETTER = re.compile(r"([^\W\d_])(?:\+|\{(\d+),\})")


def _by_first_letter(words: list[str]) -> list[str]:
    """Term patterns grouped under their first letter ("k+i+d+|k+i+d+d+o+" → "k(?:k*i+d+|k*i+d+d+o+)"),
    the same matches: ``re`` tries every branch of an alternation at every position, but skips a
    branch that starts with another letter at once, so a few dozen branches instead of hundreds
    made a search four times faster (the stream guard reads every delta; docs/ARCHITECTURE.md,
    "What it measured"). Patterns not starting with a letter stay as they are."""
    groups: dict[str, list[str]] = {}
    others = []
    for word in words:
        first = _FIRST_LETTER.match(word)
        if first is None:
            others.append(word)
            continue
        more = "*" if first.group(2) is None else f"{{{int(first.group(2)) - 1},}}"
        groups.setdefault(first.group(1), []).append(first.group(1) + more + word[first.end():])
    return [f"{re.escape(letter)}(?:{'|'.join(group)})" for letter, group in groups.items()] + others


def _substrings(terms: Iterable[str]) -> re.Pattern[str]:
    """Terms found anywhere (no word edges), for letters joined from a spaced-out run."""
    patterns = {_term_pattern(t.rstrip("*")).removesuffix(r"(?:e?s)?+") for t in terms if not _CJK.search(t)}
    return re.compile("|".join(sorted((p for p in patterns if p), key=len, reverse=True)))


@dataclass
class _Matcher:
    """The built-in vocabulary plus one operator :class:`SafetyTermsFile`, compiled."""

    extra: SafetyTermsFile

    def __post_init__(self) -> None:
        extra = self.extra
        minor_terms = [*builtin.MINOR_TERMS, *extra.minor_terms]
        sexual_terms = [*builtin.SEXUAL_TERMS, *extra.sexual_terms]
        self.minor_re = _alternation(minor_terms)
        self.sexual_re = _alternation(sexual_terms)
        self.minor_sub_re = _substrings(minor_terms)
        self.sexual_sub_re = _substrings(sexual_terms)
        self.adult_re = _alternation(builtin.ADULT_MARKERS)
        self.allowed_re = re.compile("|".join(f"(?:{p})" for p in builtin.ALLOWED_PHRASES))
        self.minor_pattern_res = [re.compile(p) for p in (*builtin.MINOR_PATTERNS, *extra.minor_patterns)]
        self.number_words = {fold(w): v for w, v in {**extra.number_words, **builtin.NUMBER_WORDS}.items()}
        age = self._age_regex()
        self.age_tail_re = re.compile(age + builtin.AGE_TAIL_PATTERN)
        self.age_lead_re = re.compile(
            "(?:" + "|".join(builtin.AGE_LEAD_PATTERNS) + ")" + age
            + r"(?!\s*(?:/|out\s*of|%|feet|foot|ft\b|'|\"|cm\b|mm\b|m\b|inch|in\b|kg\b|kilos?\b|lbs?\b|pounds?\b|"
            r"minutes?\b|mins?\b|hours?\b|hrs?\b|seconds?\b|o.?clock|am\b|pm\b|:\d|times\b|stars?\b|points?\b|"
            r"dollars?\b|bucks\b|euros?\b|k\b|x\b|\.\d|,\d|kids|children|sons|daughters))"
        )
        self.extra_age_res = [re.compile(p.replace(AGE_PLACEHOLDER, age)) for p in extra.age_patterns]
        self.person_paren_re = re.compile(
            r"\b(?:girl|boy|daughter|son|niece|nephew|student|kid|child|she|he|her|him|sister|brother)"
            r"\s*[(\[,]\s*(?P<age>\d{1,2})\s*[)\]]?(?=\s*(?:[,.;)\]]|$))", re.MULTILINE)
        self.name_age_re = re.compile(r"\b[A-Z][a-z]{1,15}\s*(?:\(\s*(?P<a>\d{1,2})\s*\)|,\s*(?P<b>\d{1,2})\s*(?=[,.;)]|$))",
                                      re.MULTILINE)
        self.object_re = re.compile(r"\b(?:" + "|".join(map(re.escape, builtin.AGE_OBJECTS)) + r")s?\b")
        self.leet = str.maketrans({**{k: v for k, v in extra.leetspeak.items()}, **LEETSPEAK})
        leet_chars = re.escape("".join(LEETSPEAK) + "".join(extra.leetspeak))
        self.leet_token_re = re.compile(rf"[\w{leet_chars}]+")
        self.leet_near_letter_re = re.compile(rf"[^\W\d_][{leet_chars}]|[{leet_chars}][^\W\d_]")
        seps = "".join(dict.fromkeys(SEPARATORS + extra.separators + "\t\n"))
        sep_class = "[" + re.escape(seps) + "]+"
        unit = rf"[^\W_]|[{leet_chars}]"
        self.spaced_run_re = re.compile(rf"(?<![^\W_])(?:{unit})(?:{sep_class}(?:{unit})){{2,}}(?![^\W_])")
        self.sep_strip_re = re.compile(sep_class)
        inner = "".join(ch for ch in seps if not ch.isspace())
        self.inner_sep_re = re.compile(rf"(?<=[^\W\d_])[{re.escape(inner)}]+(?=[^\W\d_])")
        # Multi-word terms count joined too ("juniorhigh" in "juniorhighgirl").
        single = [re.sub(r"[\W_]+", "", fold(t.rstrip("*"))) for t in (*minor_terms, *sexual_terms)
                  if not _CJK.search(t)]
        self.signal_words = frozenset(w for w in single if w.isalpha() and len(w) >= 3)
        self.compound_vocab = self.signal_words | {fold(w) for w in builtin.COMPOUND_GLUE}
        self.longest_word = max(map(len, self.compound_vocab))
        self.split_cache: dict[str, list[str] | None] = {}
        self.recent: dict[str, tuple[bool, bool]] = {}  # text → signals (:meth:`signals`)
        self.recent_chars = 0
        self.recent_lock = threading.Lock()  # read from the API's CPU threads and its event loop

    # ------------------------------------------------------------------ views
    def _age_regex(self) -> str:
        """The ``age`` group: digits, a number word, or tens + unit ("twenty one")."""
        words = self.number_words
        tens = sorted((w for w, v in words.items() if v >= 20 and v % 10 == 0), key=len, reverse=True)
        units = sorted((w for w, v in words.items() if 0 < v < 10), key=len, reverse=True)
        every = sorted(words, key=len, reverse=True)
        return ("(?P<age>(?<![\\d.,])\\d{1,3}(?![\\d]|[.,]\\d)"
                rf"|\b(?:{'|'.join(map(re.escape, tens))})[\s-]*(?:{'|'.join(map(re.escape, units))})\b"
                rf"|\b(?:{'|'.join(map(re.escape, every))})\b)")

    def _deleet(self, text: str) -> str:
        if not self.leet_near_letter_re.search(text):
            return text  # no symbol or digit touches a letter: nothing to map

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

        joined = self.inner_sep_re.sub("", self.spaced_run_re.sub(join, text))
        return _REPEATS.sub(r"\1\1", joined), runs

    def _split(self, word: str) -> list[str] | None:
        """``word`` as a sequence of the gate's words and glue ("nudechild" → nude, child), or None
        (remembered: the words of ordinary text repeat)."""
        if word in self.split_cache:
            return self.split_cache[word]
        if len(self.split_cache) > 50_000:
            self.split_cache.clear()
        parts = self.split_cache[word] = self._split_word(word)
        return parts

    def _split_word(self, word: str) -> list[str] | None:
        best: list[list[str] | None] = [None] * (len(word) + 1)
        best[0] = []
        for end in range(1, len(word) + 1):
            for start in range(max(0, end - self.longest_word - 2), end):
                if best[start] is None:
                    continue
                piece = word[start:end]
                if piece in self.compound_vocab or (piece.endswith("s") and piece[:-1] in self.signal_words):
                    best[end] = [*best[start], piece]  # type: ignore[misc]
                    break
        parts = best[-1]
        if parts and len(parts) >= 2 and any(p in self.signal_words or p[:-1] in self.signal_words for p in parts):
            return parts
        return None

    def _compounds(self, text: str) -> str:
        def split(match: re.Match[str]) -> str:
            word = match.group(0)
            parts = self._split(word) if word not in self.compound_vocab else None
            return " ".join(parts) if parts else word

        return re.sub(r"[a-z]{5,40}", split, text)

    def _views_and_runs(self, text: str, sources: Iterable[str] | None = None) -> tuple[list[str], list[str], list[str]]:
        views: list[str] = []
        runs: list[str] = []
        written: list[str] = []
        for source in (text,) if sources is None else sources:
            camel = split_camel(source)
            if camel != source:
                views.append(_REPEATS.sub(r"\1\1", self._compounds(fold(camel))))
            base = _REPEATS.sub(r"\1\1", fold(source))
            written.append(source)
            deleet = self._deleet(base)
            joined, base_runs = self._joined(base)
            deleet_joined, leet_runs = self._joined(deleet)
            views += [base, deleet, joined, deleet_joined, self._compounds(deleet_joined)]
            runs += [*base_runs, *leet_runs]
        return list(dict.fromkeys(views)), list(dict.fromkeys(runs)), written

    def views(self, text: str) -> list[str]:
        hidden, whole = decodings(text)
        return self._views_and_runs(text, [text, *hidden, *whole])[0]

    # ------------------------------------------------------------------ signals
    def signals(self, text: str) -> tuple[bool, bool]:
        """:meth:`read`, remembered for the last texts read: a chat's messages are read by the
        prompt gate, then again as the context of its answer's :class:`StreamGuard` (on the event
        loop, where a 400-word prompt cost 17 ms; docs/ARCHITECTURE.md, "What it measured")."""
        with self.recent_lock:
            found = self.recent.get(text)
        if found is None:
            found = self.read(text)
            if len(text) <= RECENT_CHARS:
                with self.recent_lock:
                    if text not in self.recent:  # two threads may have read the same text at once
                        self.recent_chars += len(text)
                    self.recent[text] = found
                    while self.recent_chars > RECENT_CHARS or len(self.recent) > RECENT_TEXTS:
                        oldest = next(iter(self.recent))  # dicts keep insertion order: the oldest first
                        del self.recent[oldest]
                        self.recent_chars -= len(oldest)
        return found

    def read(self, text: str) -> tuple[bool, bool]:
        """(minor signal, sexual signal) in ``text`` with the runs it hides (base64, hex) decoded,
        or both in one whole-text transform (rot13, reversed): those turn ordinary words into
        others ("un" reversed is "nu"), so a transform's signals are not mixed with the text's."""
        hidden, whole = decodings(text)
        minor, sexual = self._signals([text, *hidden])
        for transformed in whole:
            if minor and sexual:
                break
            if all(self._signals([transformed], both=True)):
                return True, True
        return minor, sexual

    def _signals(self, sources: list[str], both: bool = False) -> tuple[bool, bool]:
        """The two signals in ``sources`` read together; ``both``: only whether both are there
        (the minor signal is not looked for when the sexual one is missing)."""
        views, runs, written = self._views_and_runs(sources[0], sources)
        cleared: dict[str, str] = {}

        def hit(found, view: str) -> bool:
            # Exemptions ("minor league") are blanked only in a view where something matched:
            # most text matches nothing, and blanking is the costlier step.
            if not found(view):
                return False
            if view not in cleared:
                cleared[view] = self.allowed_re.sub(lambda m: " " * len(m.group(0)), view)
            return bool(found(cleared[view]))

        sexual = any(hit(self.sexual_re.search, view) for view in views) or any(
            self.sexual_sub_re.search(run) for run in runs)
        if both and not sexual:
            return False, False
        minor = (any(hit(self._minor_in_view, view) for view in views)
                 or any(self.minor_sub_re.search(run) for run in runs)
                 or any(self._named_minor(source) for source in written))
        return minor, sexual

    def steers_young(self, negative_prompt: str) -> bool:
        """Whether a negative prompt pushes a picture away from adulthood."""
        return any(self.adult_re.search(view) for view in self._views_and_runs(negative_prompt)[0])

    def _minor_in_view(self, view: str) -> bool:
        return bool(
            self.minor_re.search(view)
            or any(pattern.search(view) for pattern in self.minor_pattern_res)
            or self._has_minor_age(view)
        )

    def _named_minor(self, source: str) -> bool:
        """"Anna (14)", "Anna, 14," (a capitalised name, then an age) in the text as written."""
        for match in self.name_age_re.finditer(source):
            age = int(match.group("a") or match.group("b"))
            if age < MIN_ADULT_AGE and not self._about_object(fold(source), match.start(), match.end()):
                return True
        return False

    def _has_minor_age(self, view: str) -> bool:
        for pattern in (self.age_tail_re, self.age_lead_re, self.person_paren_re, *self.extra_age_res):
            for match in pattern.finditer(view):
                age = self._read_age(match.group("age"))
                if age is not None and age < MIN_ADULT_AGE and not self._about_object(view, match.start(), match.end()):
                    return True
        return False

    def _about_object(self, view: str, start: int, end: int) -> bool:
        """An age that belongs to a thing: an object word just before or after it."""
        return bool(self.object_re.search(view[max(0, start - 32):start]) or self.object_re.search(view[end:end + 24]))

    def _read_age(self, raw: str | None) -> int | None:
        if not raw:
            return None
        raw = raw.strip()
        if raw.isdigit():
            return int(raw)
        values = [self.number_words.get(word) for word in re.split(r"[\s-]+", raw) if word]
        if not values or any(value is None for value in values):
            return None
        return sum(values)  # type: ignore[arg-type]

"""Pure: how the content-safety gate reads text (docs/ARCHITECTURE.md, "Content-safety gate").

:func:`fold` turns any text into one plain form, from Unicode's own data rather than hand lists:
NFKC; every format, control, private-use and unassigned character, combining mark (accents,
variation selectors) and tag character dropped; every space-like or blank character (space
separators, fillers, the braille blank) made a space; every confusable folded to the ASCII letter or
digit it imitates (Unicode's confusables table as shipped by ``confusable_homoglyphs``, followed
transitively, then the character's Unicode name: "LATIN LETTER SMALL CAPITAL K" is a k); other
scripts' digits made ASCII; case folded. The gate's terms go through the same :func:`fold`, so a
Russian or Japanese term still matches its own script.

:func:`decodings` gives what a text may hide: base64 runs decoded, rot13 and reversed text.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import re
import unicodedata
from importlib import resources

_ASCII_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_NAME_LETTER = re.compile(
    r"\bLATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL |INSULAR |TURNED |REVERSED |DOTLESS |SCRIPT |"
    r"CLOSED |OPEN |STRETCHED |SIDEWAYS |BARRED |LONG )?([A-Z])(?: |$)|"
    r"\bREGIONAL INDICATOR SYMBOL LETTER ([A-Z])$|\bSQUARED LATIN CAPITAL LETTER ([A-Z])$"
)
_KEEP_CONTROLS = frozenset("\n\t")


@functools.cache
def _confusable_targets() -> dict[str, str]:
    """Each confusable character → the ASCII letter or digit it imitates (letters preferred),
    following the table's links transitively ("ᴋ" → "ĸ" → "k")."""
    raw = json.loads(resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8"))
    links: dict[str, set[str]] = {}
    for char, entries in raw.items():
        for entry in entries:
            other = entry["c"]
            if len(char) == 1 and len(other) == 1:
                links.setdefault(char, set()).add(other)
                links.setdefault(other, set()).add(char)
    targets: dict[str, str] = {}
    for char in links:
        if char.casefold() in _ASCII_ALNUM or char in _ASCII_ALNUM:
            continue
        seen, frontier, found = {char}, [char], []
        for _ in range(3):  # three links are enough for every chain in the table
            nxt = []
            for node in frontier:
                for other in links.get(node, ()):
                    if other in seen:
                        continue
                    seen.add(other)
                    low = other.casefold()
                    if low in _ASCII_ALNUM:
                        found.append(low)
                    nxt.append(other)
            if found:
                break
            frontier = nxt
        if found:
            letters = sorted(c for c in found if c.isalpha())
            targets[char] = (letters or sorted(found))[0]
    return targets


@functools.lru_cache(maxsize=65536)
def _fold_char(char: str) -> str:
    """One (NFKC-normalised, case-folded) character in its plain form."""
    if char in _ASCII_ALNUM or char == " ":
        return char
    if char in _KEEP_CONTROLS:
        return char
    category = unicodedata.category(char)
    if category in ("Cf", "Cc", "Co", "Cs", "Cn", "Mn", "Me"):
        return ""
    name = unicodedata.name(char, "")
    if category[0] == "Z" or "FILLER" in name or name.startswith("BRAILLE PATTERN BLANK"):
        return " "
    if category == "Nd":
        return str(unicodedata.digit(char))
    target = _confusable_targets().get(char)
    if target is not None:
        return target
    match = _NAME_LETTER.search(name)
    if match:
        return next(group for group in match.groups() if group).lower()
    return char


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z][a-z])")


def split_camel(text: str) -> str:
    """Camel case split ("NudeTeen" → "Nude Teen"), a reading of its own: random case ("naKed")
    must still read whole."""
    return _CAMEL.sub(" ", text)


def fold(text: str) -> str:
    """The plain form of ``text`` (see the module docstring)."""
    if text.isascii():
        return text.translate(_ascii_folds())
    return _fold_any(text)


def _fold_any(text: str) -> str:
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    out = "".join(_fold_char(ch) for ch in text.casefold())
    # A folded character may itself have a case or a compatibility form (Cherokee, small capitals).
    return "".join(_fold_char(ch) for ch in unicodedata.normalize("NFKC", out).casefold())


@functools.cache
def _ascii_folds() -> dict[int, str]:
    """Each ASCII character's plain form. ASCII text folds one character at a time (normalising and
    case folding keep it ASCII, and every character folds to ASCII or nothing), so one
    ``str.translate`` gives what :func:`_fold_any` does: the gate reads every streamed delta and
    every chat message, mostly ASCII, and the per-character loop was a third of its time
    (docs/ARCHITECTURE.md, "What it measured")."""
    return {code: _fold_any(chr(code)) for code in range(128)}


# ----------------------------------------------------------------------------- hidden text
_B64_RUN = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{4,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX_RUN = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[\s:]?){8,}(?![0-9A-Fa-f])")


def _readable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or sum(ch.isprintable() or ch.isspace() for ch in text) < 0.9 * len(text):
        return None
    return text if sum(ch.isalpha() for ch in text) >= 3 else None


def decodings(text: str, limit: int = 512) -> tuple[list[str], list[str]]:
    """What ``text`` may hide: (base64 (standard or URL-safe) and hex runs decoded, [the whole text
    rot13-decoded, reversed]). At most ``limit`` runs are tried (bounded work on long input)."""
    found: list[str] = []
    for count, match in enumerate(_B64_RUN.finditer(text)):
        if count >= limit:
            break
        run = match.group(0).rstrip("=")
        if run.isalpha() and (run.islower() or run.isupper()):
            continue  # a plain word, not base64
        padded = run + "=" * (-len(run) % 4)
        for decoder in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                decoded = _readable(decoder(padded.replace("-", "+").replace("_", "/") if decoder is base64.b64decode
                                            else padded))
            except (binascii.Error, ValueError):
                continue
            if decoded:
                found.append(decoded)
                break
    for count, match in enumerate(_HEX_RUN.finditer(text)):
        if count >= limit:
            break
        try:
            decoded = _readable(bytes.fromhex(re.sub(r"[\s:]", "", match.group(0))))
        except ValueError:
            continue
        if decoded:
            found.append(decoded)
    return found, [codecs.decode(text, "rot13"), text[::-1]]

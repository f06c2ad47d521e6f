"""CaseOps: a lossless text transform that moves ASCII capitalization into four operator characters.

The transform (lossless_caps_caseops_v1, the text side of the published FineWeb CaseOps export) is
applied to each document before SentencePiece, so that "The", "THE" and "the" share the pieces of
"the" and capitalization costs one operator token. Pure Python (numpy for the byte weights).

    from data import caseops
    t = caseops.encode("The NASA iPhone")    # '\\ue001the \\ue002nasa i\\ue003phone'
    caseops.decode(t)                        # 'The NASA iPhone'
    caseops.byte_weights(t).sum()            # 15 == len("The NASA iPhone".encode("utf-8"))

Operators (Unicode private-use characters; a CaseOps tokenizer reserves them as
SentencePiece user_defined_symbols, ids 4..7 in this order):
    TITLE   = U+E001   the next ASCII word starts with a capital
    ALLCAPS = U+E002   the next ASCII word is all capitals
    CAPNEXT = U+E003   the next letter of the current word is a capital
    ESC     = U+E004   the next character is a literal (an operator character of the input)

encode(text), exactly. A "letter" is an ASCII letter A-Z or a-z; nothing else is (not digits, not
"_", not non-ASCII letters such as "É", which pass through unchanged). Scan text left to right:
  1. A character c in {U+E001, U+E002, U+E003, U+E004} is written as ESC + c.
  2. A letter starts a word W: the maximal run of letters from there (any non-letter, including an
     operator character, ends it). Let w be W with A-Z mapped to a-z. Write:
       a. W all lowercase                        -> w
       b. len(W) >= 2 and W all uppercase        -> ALLCAPS + w
       c. W[0] uppercase, W[1:] all lowercase    -> TITLE + w        (a lone capital "A" is here)
       d. otherwise (mixed case)                 -> TITLE if W[0] is uppercase, then w[0], then for
                                                    each later position k: CAPNEXT if W[k] is
                                                    uppercase, then w[k]
  3. Any other character is written unchanged.
So the output holds no uppercase ASCII letter, and every operator it holds is either acting (TITLE
or ALLCAPS right before the first letter of a word, CAPNEXT right before a later letter, ESC) or
the literal right after an ESC. Examples: "Hello" -> TITLE "hello"; "NASA" -> ALLCAPS "nasa";
"A" -> TITLE "a"; "iPhone" -> "i" CAPNEXT "phone"; "McDonald" -> TITLE "mc" CAPNEXT "donald";
"ABc" -> TITLE "a" CAPNEXT "bc"; "ABC_DEF" -> ALLCAPS "abc" "_" ALLCAPS "def"; "U+E001" typed in the
input (the character) -> ESC U+E001.

decode(text) inverts it: decode(encode(t)) == t for every str t. Reading left to right, with
"in a word" meaning the last character written was a letter (operators write nothing):
  ESC c    -> write c literally (c must be an operator character); ends a word
  TITLE    -> the next character must be a letter starting a word; write it uppercase
  ALLCAPS  -> the same, and every further letter of that word is written uppercase
  CAPNEXT  -> the next character must be a letter; write it uppercase
  a letter -> written as is, unless made uppercase by the rules above
  other    -> written as is; ends a word
An operator in a place encode never puts one (a dangling operator, TITLE inside a word, ESC before
a non-operator, an uppercase ASCII letter in the text) raises CaseOpsError, as does any other string
encode never makes (CAPNEXT + "a" for "A"): decode is one-to-one.

byte_weights(transformed) gives, per character of a transformed string, how many bytes of the
ORIGINAL text's UTF-8 it stands for: 0 for an acting operator (TITLE, ALLCAPS, CAPNEXT, ESC),
3 for a literal operator after an ESC (its own UTF-8 length), and its UTF-8 length for any other
character (a lowercased ASCII letter stands for one byte either way). Summed over a whole
transformed document it is len(original.encode("utf-8")), exactly. This is what the per-token byte
sidecar (fineweb_val_bytes_*.bin, written by data/tokenize_jsonl.py --caseops) is built from: each
token is charged the weights of the characters it covers, so BPB divides by the original bytes.
"""
import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}
_OPS = frozenset(OPERATORS)


class CaseOpsError(ValueError):
    """decode() was given a string that encode() cannot produce (a misplaced or dangling operator)."""


def _is_letter(c: str) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z"


def encode(text: str) -> str:
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _OPS:
            out += (ESC, c)
            i += 1
            continue
        if not _is_letter(c):
            out.append(c)
            i += 1
            continue
        j = i + 1
        while j < n and _is_letter(text[j]):
            j += 1
        word = text[i:j]
        low = word.lower()  # ASCII only here, so lower() maps exactly A-Z to a-z
        if word == low:
            out.append(word)
        elif len(word) >= 2 and word.isupper():
            out += (ALLCAPS, low)
        elif word[1:] == low[1:]:  # first letter uppercase (the word is not all lowercase), rest lowercase
            out += (TITLE, low)
        else:
            if word[0] != low[0]:
                out.append(TITLE)
            out.append(low[0])
            for orig, lc in zip(word[1:], low[1:]):
                if orig != lc:
                    out.append(CAPNEXT)
                out.append(lc)
        i = j
    return "".join(out)


def decode(text: str) -> str:
    out = []
    escape = False
    pending = None  # TITLE or ALLCAPS waiting for the first letter of a word
    capnext = False
    allcaps = False  # inside a word opened by ALLCAPS
    in_word = False
    for pos, c in enumerate(text):
        if escape:
            if c not in _OPS:
                raise CaseOpsError(f"ESC at offset {pos - 1} escapes {c!r}, not an operator character")
            out.append(c)
            escape = in_word = allcaps = False
            continue
        if c in _OPS and (pending is not None or capnext):
            raise CaseOpsError(f"{NAMES[c]} at offset {pos} follows {NAMES[pending or CAPNEXT]}, "
                               f"which needs a letter")
        if c == ESC:
            escape = True
        elif c == TITLE or c == ALLCAPS:
            if in_word:
                raise CaseOpsError(f"{NAMES[c]} at offset {pos} inside a word")
            pending = c
        elif c == CAPNEXT:
            capnext = True
        elif "a" <= c <= "z":
            if not in_word:
                upper = pending is not None or capnext
                allcaps = pending == ALLCAPS
                in_word = True
            else:
                upper = allcaps or capnext
            out.append(c.upper() if upper else c)
            pending, capnext = None, False
        elif "A" <= c <= "Z":
            raise CaseOpsError(f"uppercase ASCII letter {c!r} at offset {pos}: not a CaseOps-encoded string")
        else:
            if pending is not None or capnext:
                raise CaseOpsError(f"{NAMES[pending or CAPNEXT]} before offset {pos} is followed by "
                                   f"{c!r}, not a letter")
            out.append(c)
            in_word = allcaps = False
    if escape or pending is not None or capnext:
        raise CaseOpsError(f"dangling {NAMES[ESC if escape else pending or CAPNEXT]} at the end")
    original = "".join(out)
    if encode(original) != text:  # operators each in an allowed place, yet not encode's choice ("\ue003a" for "A")
        raise CaseOpsError("not the encoding encode gives (another operator spells the same case)")
    return original


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def utf8_lengths(cps: np.ndarray) -> np.ndarray:
    """UTF-8 byte length of each code point (1..4) as int64."""
    return 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)


def byte_weights(transformed: str) -> np.ndarray:
    """Per character of a transformed string: the original UTF-8 bytes it stands for (int64); see the
    module docstring. Sums to len(decode(transformed).encode("utf-8"))."""
    cps = codepoints(transformed)
    w = utf8_lengths(cps)
    literal = -1
    for i in np.flatnonzero((cps >= 0xE001) & (cps <= 0xE004)).tolist():  # operators are rare: a short loop
        if i == literal:
            continue  # the literal after an ESC keeps its own 3 bytes
        w[i] = 0
        if cps[i] == 0xE004:
            literal = i + 1
    return w

"""Deterministic corpus of varied strings for the tokenizer parity tests.

``corpus(n, seed)`` returns ``n`` strings drawn, round-robin, from the generators below (each uses
the same seeded ``random.Random``), so every run and every machine sees the same texts.  The kinds
cover what captions and prompts contain and what breaks tokenizers: ASCII captions, accents
(precomposed and combining), CJK / kana / Hangul / full-width forms, emoji (ZWJ sequences, skin
tones, flags, keycaps, tag sequences), punctuation runs, white-space oddities, control characters,
digits mixed with letters, HTML entities, very long texts, apostrophe contractions, mixed scripts,
the tokenizers' own special-token spellings, and random code points.
"""

from __future__ import annotations

import csv
import random
import unicodedata
from pathlib import Path

WORDS = (
    "a photo of the cat dog bird flower car plane boat small large red blue green yellow sunflower rose "
    "daisy tulip orchid sparrow warbler gull pelican sedan coupe convertible truck close-up bright dark "
    "blurry cropped painting sketch rendering picture image itap good bad beautiful ugly cool weird one two "
    "three in on under with and or but new old black white kitten puppy tree mountain river city street "
    "night day macro shot studio portrait ALL CAPS Title Case McDonald's O'Neill e-mail re-entry x-ray "
    "well-known state-of-the-art 3D 4K HDR DSLR iPhone JPEG PNG covid-19 co-op naïve café résumé"
).split()
ACCENTED = "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝÞßŁłŒœŠšŽžĞğİıŞşŐőŰűĀāĒēĪīŌōŪū"
COMBINING = "\u0300\u0301\u0302\u0303\u0308\u030a\u030c\u0327\u0328\u0331\u0323\u0345"
ACCENT_WORDS = ("café", "naïve", "crème brûlée", "Müller", "Ångström", "São Paulo", "Zürich", "piñata", "façade",
                "Dvořák", "Łódź", "Ærøskøbing", "fiancée", "jalapeño", "Straße", "İstanbul", "Þórr", "Œuvre", "mañana")
CJK = ("一只猫坐在垫子上", "北京天安门", "野口里佳", "猫と犬の写真", "ひまわり", "カタカナ", "ｶﾀｶﾅ", "한국어 텍스트", "사진",
       "東京タワー", "漢字かな交じり文", "𠀋𡈽𡌛", "（全角）", "ＡＢＣ１２３", "「引用」", "、。・", "〜", "㈱", "㍻")
EMOJI = ("😀", "🐱", "🌻", "🚗", "✈️", "👍🏽", "👍🏿", "👩‍👩‍👧‍👦", "👨🏻‍💻", "🏳️‍🌈", "🇫🇷", "🇯🇵", "1️⃣", "#️⃣",
         "🏴󠁧󠁢󠁷󠁬󠁳󠁿", "❤️", "♥", "☺️", "🤷‍♀️", "🧑🏾‍🤝‍🧑🏻", "🫠", "🥺", "💯", "🔥🔥🔥", "👀", "🙏🏼", "©", "®", "™")
PUNCT = ("!!!", "???", "?!", "...", "…", "--", "—", "–", "''", '""', "“", "”", "‘", "’", "«", "»", "„", "(", ")", "[", "]",
         "{", "}", "<", ">", "/", "\\", "|", "@", "#", "$", "%", "^", "&", "*", "_", "~", "`", "+", "=", ";", ":", ",",
         "¡", "¿", "§", "¶", "•", "·", "†", "‡", "※", "‰", "′", "″", "⁂", "、", "。", "<<>>", "!?!?", "-_-", ":-)", ";)")
SPACES = (" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2028", "\u2029", "\u200b", "\u200c", "\u200d", "\ufeff",
          "\u3000", "\u2003", "\u2009", "\u202f", "\u205f", "\u1680", "\u180e", "\x0b", "\x0c", "\x1c", "\x1f", "\x85")
CONTROLS = tuple(chr(c) for c in list(range(0, 32)) + [0x7F]) + ("\x1b[31m", "\x1b[0m", "\x1b[1;32m", "\ufffd", "\ufffc",
                                                                   "\u206a", "\ufff9", "\u200e", "\u200f", "\u202e", "\u00ad")
ENTITIES = ("&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&eacute;", "&EACUTE;", "&Eacute;", "&copy;",
            "&hellip;", "&mdash;", "&amp;amp;", "&amp;lt;", "&#8217;", "&#x2019;", "&#128512;", "&rarr;", "&NTILDE;",
            "&SZLIG;", "&#0;", "&#xZZ;", "&notanentity;", "&amp", "&lt", "&#65", "&#x41;", "&frac12;", "&trade;",
            "&Jscr;", "&checkmark;", "&#150;", "&#x80;", "&#1234567;", "&AMP;", "&LTILDE;")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'VE", "'M", "'LL", "'D", "’s", "’ll",
                "'ſ", "''s", "'", "n't", "N'T", "'em", "'tis", "o'clock", "rock'n'roll")
SCRIPTS = ("Привет мир", "фотография кошки", "ЁЛКА", "Ελληνικά", "ΟΔΟΣ ΣΟΦΟΣ", "σοφός", "مرحبا بالعالم", "صُورَة", "שָׁלוֹם",
           "नमस्ते दुनिया", "फ़ोटो", "สวัสดีชาวโลก", "ภาพถ่าย", "தமிழ்", "ქართული", "Հայերեն", "አማርኛ", "ພາສາລາວ",
           "မြန်မာ", "ᚠᚢᚦ", "ꦗꦮ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝟙𝟚𝟛", "ⅫⅣ", "½ ¾ ²³", "٠١٢٣", "۱۲۳", "१२३", "〇", "Ⓐⓑ", "ℌℑ")
SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<|STARTOFTEXT|>", "<|ſtartoftext|>", "<|endoftext|>x", "[CLS]", "[SEP]",
           "[MASK]", "[PAD]", "[UNK]", "[cls]", "[MASK][MASK]", "[[MASK]]", "##ing", "</w>")
# Code point ranges sampled by the random-soup generator: assigned, non-surrogate blocks of many kinds.
SOUP_RANGES = ((0x20, 0x7E), (0xA0, 0x24F), (0x250, 0x36F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0xDFF),
               (0xE00, 0xEFF), (0x1100, 0x11FF), (0x1E00, 0x1FFF), (0x2000, 0x2BFF), (0x2E00, 0x2E7F),
               (0x3000, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xA000, 0xA4CF), (0xAC00, 0xD7A3),
               (0xF900, 0xFAFF), (0xFB00, 0xFDFF), (0xFE00, 0xFFFD), (0x10000, 0x1019F), (0x1D400, 0x1D7FF),
               (0x1F000, 0x1FAFF), (0x20000, 0x2A6DF), (0xE0000, 0xE007F))


def _caption(r: random.Random) -> str:
    n = r.randint(1, 14)
    words = [r.choice(WORDS) for _ in range(n)]
    if r.random() < 0.3:
        words = [w.capitalize() if r.random() < 0.5 else w.upper() for w in words]
    text = " ".join(words)
    return text + r.choice(("", ".", "!", "?", " .", ",", "..."))


def _accents(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 6)):
        k = r.random()
        if k < 0.4:
            parts.append(r.choice(ACCENT_WORDS))
        elif k < 0.7:
            parts.append("".join(r.choice(ACCENTED + "abcdefxyz") for _ in range(r.randint(1, 10))))
        else:  # decomposed: base letter + combining marks
            parts.append("".join(r.choice("aeiouncAEIOUNC") + "".join(r.choice(COMBINING) for _ in range(r.randint(0, 3)))
                                 for _ in range(r.randint(1, 6))))
    text = " ".join(parts)
    return unicodedata.normalize(r.choice(("NFC", "NFD", "NFKC", "NFKD")), text) if r.random() < 0.3 else text


def _cjk(r: random.Random) -> str:
    parts = [r.choice(CJK) for _ in range(r.randint(1, 4))]
    if r.random() < 0.5:
        parts.insert(r.randint(0, len(parts)), r.choice(WORDS))
    return r.choice(("", " ")).join(parts)


def _emoji(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 6)):
        parts.append(r.choice(EMOJI) if r.random() < 0.6 else r.choice(WORDS))
    return r.choice(("", " ")).join(parts)


def _punct(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 8)):
        parts.append("".join(r.choice(PUNCT) for _ in range(r.randint(1, 5))) if r.random() < 0.6 else r.choice(WORDS))
    return r.choice(("", " ")).join(parts)


def _spaces(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 8)):
        parts.append(r.choice(WORDS))
        parts.append("".join(r.choice(SPACES) for _ in range(r.randint(1, 3))))
    if r.random() < 0.5:
        parts.insert(0, r.choice(SPACES))
    return "".join(parts)


def _controls(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 6)):
        parts.append(r.choice(WORDS))
        if r.random() < 0.7:
            parts.append("".join(r.choice(CONTROLS) for _ in range(r.randint(1, 3))))
        else:
            parts.append(" ")
    return "".join(parts)


def _digits(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 6)):
        k = r.random()
        if k < 0.3:
            parts.append(str(r.randint(0, 10 ** r.randint(1, 12))))
        elif k < 0.6:
            parts.append("".join(r.choice("abcxyzABC0123456789") for _ in range(r.randint(2, 12))))
        elif k < 0.8:
            parts.append(r.choice(("3.14", "1,000", "10th", "2nd", "1/2", "50%", "$9.99", "v1.2.3", "ResNet-50", "B-52", "COVID-19",
                                   "4x4", "1080p", "24/7", "9am", "1e-4", "0x1F", "#1", "No.5", "MP3")))
        else:
            parts.append(r.choice(WORDS))
    return " ".join(parts)


def _entities(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 6)):
        parts.append(r.choice(ENTITIES) if r.random() < 0.5 else r.choice(WORDS))
    text = r.choice(("", " ")).join(parts)
    if r.random() < 0.15:
        text = r.choice(("<b>", "<i>", "a < b ", "x<y")) + text  # ftfy stops decoding entities on lines with '<'
    if r.random() < 0.15:
        text = text + "\n" + r.choice(ENTITIES) + " " + r.choice(WORDS)  # ... and on later lines
    return text


def _long(r: random.Random) -> str:
    k = r.random()
    if k < 0.5:
        return " ".join(_caption(r) for _ in range(r.randint(8, 40)))
    if k < 0.7:
        return r.choice(("a", "ab", "ha", "z", "é", "猫", "!", "1")) * r.randint(50, 400)  # one huge word / run
    if k < 0.85:
        return "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(95, 130)))  # near the 100-char UNK rule
    return " ".join(r.choice((_accents, _emoji, _cjk, _punct, _scripts))(r) for _ in range(r.randint(10, 30)))


def _contractions(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 6)):
        w = r.choice(WORDS)
        parts.append(w + r.choice(CONTRACTIONS) if r.random() < 0.7 else w)
    return " ".join(parts)


def _scripts(r: random.Random) -> str:
    parts = [r.choice(SCRIPTS) for _ in range(r.randint(1, 4))]
    if r.random() < 0.5:
        parts.append(r.choice(WORDS))
    r.shuffle(parts)
    return " ".join(parts)


def _special(r: random.Random) -> str:
    parts = []
    for _ in range(r.randint(1, 5)):
        parts.append(r.choice(SPECIAL) if r.random() < 0.5 else r.choice(WORDS))
    return r.choice(("", " ")).join(parts)


def _soup(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(1, 20)):
        lo, hi = r.choice(SOUP_RANGES)
        out.append(chr(r.randint(lo, hi)))
        if r.random() < 0.2:
            out.append(" ")
    return "".join(out)


def _mixed(r: random.Random) -> str:
    gens = (_caption, _accents, _cjk, _emoji, _punct, _spaces, _controls, _digits, _entities, _contractions, _scripts)
    return r.choice(("", " ", "\n")).join(r.choice(gens)(r) for _ in range(r.randint(2, 4)))


GENERATORS = (_caption, _accents, _cjk, _emoji, _punct, _spaces, _controls, _digits, _entities, _long,
              _contractions, _scripts, _special, _soup, _mixed)


def corpus(n: int, seed: int = 20240601) -> list[str]:
    """``n`` varied strings, the same for a given seed on every machine."""
    r = random.Random(seed)
    out = ["", " ", "\n", "a", "A.", "'s", "<|endoftext|>", "[SEP]", "&amp;", "\u0345", "ſ"]
    i = 0
    while len(out) < n:
        out.append(GENERATORS[i % len(GENERATORS)](r))
        i += 1
    return out[:n]


def real_captions(data_root: Path) -> list[str]:
    """Class names of the shared data sets, raw and in the prompts the project uses."""
    names: set[str] = set()
    for manifest in sorted(Path(data_root).glob("*/manifest.csv")):
        with open(manifest, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                names.add(row["class_name"])
    out = []
    for name in sorted(names):
        out += [name, f"a photo of a {name}.", f"A PHOTO OF THE {name.upper()}!", f"itap of a {name.replace('_', ' ')}"]
    return out

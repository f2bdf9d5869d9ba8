"""Procedural name pools: thousands of person names from syllables of several alphabets, in two disjoint pools.

Owns: drawing a name (`draw_name`, `draw_names`) from the 'train' or the 'heldout' pool, and which pool a name
belongs to (`pool_of`). No downloads, no lists to keep: a name is 2-3 syllables of one script (ASCII Latin
most often; Latin with diacritics, Greek and Cyrillic sometimes), so names tokenise very differently (a few
bytes to a dozen BPE pieces) and a name's tokens carry no prior about the person. The pools are split by a
hash of the name (`HELDOUT_FRACTION` of all names are held out), so no held-out name can ever be drawn for
training, whatever the seed.

Does not own: the small fixed name list of the older kinds (`world.NAMES`), the conversations (`recall.py`).
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

POOLS = ("train", "heldout")
HELDOUT_FRACTION = 0.2

# (onsets, vowels, codas, weight) per script; a syllable is onset + vowel (+ coda, sometimes).
_SCRIPTS = {
    "latin": (["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "j", "ch", "sh", "th",
               "br", "kr", "st", "tr", "w", "y", ""],
              ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "y"],
              ["n", "r", "l", "s", "m", "k", "th", "x"], 0.62),
    "latin_marks": (["b", "d", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z", "ł", "ś", "ž", "č", "ñ", "ð", ""],
                    ["á", "é", "í", "ó", "ú", "ä", "ö", "ü", "å", "ø", "a", "e", "o", "ã", "ê"],
                    ["n", "r", "ł", "s", "ß", "k"], 0.22),
    "greek": (["β", "γ", "δ", "κ", "λ", "μ", "ν", "π", "ρ", "σ", "τ", "φ", "χ", "θ", ""],
              ["α", "ε", "ι", "ο", "υ", "η", "ω", "ά", "ί"],
              ["ς", "ν", "ρ"], 0.08),
    "cyrillic": (["б", "в", "г", "д", "ж", "з", "к", "л", "м", "н", "п", "р", "с", "т", "ш", "ч", ""],
                 ["а", "е", "и", "о", "у", "я", "ю", "ы"],
                 ["н", "р", "й", "в"], 0.08),
}
_SCRIPT_NAMES = tuple(_SCRIPTS)
_SCRIPT_P = np.array([s[3] for s in _SCRIPTS.values()]) / sum(s[3] for s in _SCRIPTS.values())
# words of the conversations' own text that a name must not equal (case-insensitive)
_RESERVED = {"a", "and", "the", "to", "in", "at", "is", "has", "hat", "tan", "red", "go", "back", "now", "show",
             "draw", "here", "are", "undo", "give", "make", "move", "one", "oval", "park", "snow", "beach", "dark",
             "light", "grey", "blue", "long", "short", "bald", "round", "square", "night", "office", "studio"}


def _syllable(rng: np.random.Generator, script: str) -> str:
    onsets, vowels, codas, _ = _SCRIPTS[script]
    s = onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))]
    if rng.random() < 0.3:
        s += codas[rng.integers(len(codas))]
    return s


def pool_of(name: str) -> str:
    """'heldout' for HELDOUT_FRACTION of all names (by a hash of the name), else 'train'."""
    return "heldout" if zlib.crc32(name.encode("utf-8")) % 1000 < 1000 * HELDOUT_FRACTION else "train"


def draw_name(rng: np.random.Generator, pool: str = "train") -> str:
    """One name of `pool`: 2-3 syllables (1 in 5 of three), one script, capitalised."""
    if pool not in POOLS:
        raise ValueError(f"unknown name pool {pool!r}; known pools: {', '.join(POOLS)}")
    while True:
        script = _SCRIPT_NAMES[int(rng.choice(len(_SCRIPT_NAMES), p=_SCRIPT_P))]
        n = 3 if rng.random() < 0.2 else 2
        name = "".join(_syllable(rng, script) for _ in range(n))
        name = name[0].upper() + name[1:]
        if 3 <= len(name) <= 12 and name.lower() not in _RESERVED and pool_of(name) == pool:
            return name


def draw_names(rng: np.random.Generator, k: int, pool: str = "train", avoid: Sequence[str] = ()) -> list[str]:
    """`k` distinct names of `pool`, none of which contains another (so whole-word lookups stay unambiguous)."""
    out: list[str] = []
    while len(out) < k:
        n = draw_name(rng, pool)
        if all(n.lower() not in o.lower() and o.lower() not in n.lower() for o in out + list(avoid)):
            out.append(n)
    return out

"""Superclass candidates for a real model's concept: WordNet hypernyms, read offline.

WordNet 3.0's noun database installs offline from Debian (`apt-get install wordnet-base`, files in
/usr/share/wordnet) or from any copy of its `index.noun` and `data.noun` (`$SCULPT_WORDNET` names
the folder). Only those two files are read, in WordNet's own format:

    index.noun:  lemma pos synset_cnt p_cnt [ptr_symbol ...] sense_cnt tagsense_cnt offset [offset ...]
    data.noun:   offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt(3 digits)
                 [ptr_symbol offset pos source/target ...] | gloss

A concept's candidates are the lemmas of the hypernyms ("@", and "@i" for instances) of its first
`senses` senses, up to `depth` levels up, nearest first ("tench" -> "cyprinid", "cypriniform fish",
"soft-finned fish", "teleost fish", ...); `sculpt suggest` ranks them with the model's own text
encoder and proposes the most similar one.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOTS = ("/usr/share/wordnet", "/usr/local/share/wordnet")


def find_wordnet() -> Path | None:
    """The folder holding index.noun and data.noun: $SCULPT_WORDNET, else the Debian package's."""
    roots = [os.environ["SCULPT_WORDNET"]] if os.environ.get("SCULPT_WORDNET") else list(DEFAULT_ROOTS)
    for root in roots:
        if (Path(root) / "index.noun").is_file() and (Path(root) / "data.noun").is_file():
            return Path(root)
    return None


class WordNet:
    """The noun part of a WordNet database folder."""

    def __init__(self, root: str | Path):
        root = Path(root)
        for name in ("index.noun", "data.noun"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name}: not a WordNet database folder (apt-get install wordnet-base)")
        self.root = root
        self._index: dict[str, list[int]] | None = None
        self._data = (root / "data.noun").open("rb")  # read by byte offset, as WordNet is laid out

    def close(self) -> None:
        self._data.close()

    def senses(self, word: str) -> list[int]:
        """The synset offsets of a noun, most frequent sense first."""
        if self._index is None:
            self._index = {}
            with (self.root / "index.noun").open(encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):  # the licence header
                        continue
                    parts = line.split()
                    p_cnt = int(parts[3])
                    synsets = int(parts[2])
                    self._index[parts[0]] = [int(x) for x in parts[4 + p_cnt + 2: 4 + p_cnt + 2 + synsets]]
        return self._index.get(word.strip().lower().replace(" ", "_"), [])

    def _read(self, offset: int) -> tuple[list[str], list[tuple[str, int]]]:
        """(lemmas, [(pointer symbol, target offset)]) of the noun synset at `offset`."""
        self._data.seek(offset)
        parts = self._data.readline().decode("utf-8").split(" | ")[0].split()
        n_words = int(parts[3], 16)
        lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        at = 4 + 2 * n_words
        pointers = []
        for i in range(int(parts[at])):
            symbol, target, pos = parts[at + 1 + 4 * i], parts[at + 2 + 4 * i], parts[at + 3 + 4 * i]
            if pos == "n":
                pointers.append((symbol, int(target)))
        return lemmas, pointers

    def synset(self, offset: int) -> tuple[list[str], list[int]]:
        """(lemmas, hypernym offsets) of the synset at `offset`."""
        lemmas, pointers = self._read(offset)
        return lemmas, [t for sym, t in pointers if sym in ("@", "@i")]

    def same_or_below(self, word: str, senses: int = 2, limit: int = 5000) -> set[str]:
        """Every lemma that names the word or a kind of it: the lemmas of its first `senses` noun senses
        (its synonyms; WordNet lists the most frequent first) and of all their hyponyms ("~", and "~i"
        for instances), transitively, casefolded ("church" -> church building, cathedral, chapel, ...).
        Rare senses stay out: all of "house"'s would reach the zodiac's houses, and Pisces is "fish".
        At most `limit` synsets are read."""
        out: set[str] = set()
        first = self.senses(word)[:senses]
        level, seen = list(first), set(first)
        while level and len(seen) <= limit:
            nxt = []
            for offset in level:
                lemmas, pointers = self._read(offset)
                out.update(w.casefold() for w in lemmas)
                for sym, target in pointers:
                    if sym in ("~", "~i") and target not in seen:
                        seen.add(target)
                        nxt.append(target)
            level = nxt
        return out

    def hypernyms(self, word: str, depth: int = 4, senses: int = 2) -> list[str]:
        """Lemmas of the hypernyms of the word's first `senses` senses, level by level up to `depth`,
        each once, nearest first."""
        out: list[str] = []
        level = self.senses(word)[:senses]
        seen = set(level)
        for _ in range(depth):
            nxt = []
            for offset in level:
                for h in self.synset(offset)[1]:
                    if h not in seen:
                        seen.add(h)
                        nxt.append(h)
            for offset in nxt:
                out += [w for w in self.synset(offset)[0] if w not in out]
            level = nxt
        return out

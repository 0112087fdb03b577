"""Path patterns for ``extract`` and ``list`` arguments, in Borg's styles.

A pattern is a path prefix (``pp:``, and a plain argument without glob characters:
the item and everything below it), a shell glob (``sh:``, and a plain argument with
``*``, ``?`` or ``[``: ``*`` and ``?`` stop at ``/``, ``**`` spans directories), an
fnmatch glob (``fm:``: ``*`` spans ``/`` too) or a regular expression (``re:``,
searched anywhere in the path). Like Borg's, a glob that matches a directory also
matches everything below it. Archive paths have no leading ``/``; patterns lose theirs.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from ..errors import UsageError

_GLOB_CHARS = set("*?[")


def _shell_regex(pat: str) -> str:
    """Borg's ``sh:`` style as a regular expression (without anchors)."""
    out, i, n = [], 0, len(pat)
    while i < n:
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pat.find("]", i + 2 if pat[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = pat[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass
class Pattern:
    text: str  # as the user gave it (named in warnings)
    regex: re.Pattern[str]
    anywhere: bool = False  # re: searches the whole path, the others match from its start
    hits: int = 0

    @classmethod
    def parse(cls, text: str) -> Pattern:
        style, sep, body = text.partition(":")
        if not sep or style not in ("pp", "sh", "fm", "re"):
            style, body = ("sh" if _GLOB_CHARS & set(text) else "pp"), text
        if style == "re":
            try:
                return cls(text, re.compile(body), anywhere=True)
            except re.error as e:
                raise UsageError(f"invalid regular expression {body!r}: {e}") from None
        body = body.strip("/")
        if style == "pp":
            rx = re.escape(body)
        elif style == "sh":
            rx = _shell_regex(body)
        else:  # fm: fnmatch.translate gives a whole anchored regex; take its core
            rx = fnmatch.translate(body).removeprefix("(?s:").removesuffix(")\\Z")
        # the path itself, or anything below it (a match ending at a "/")
        return cls(text, re.compile(f"(?s:{rx})(?:/.*)?\\Z" if body else ".*"))

    def match(self, path: str) -> bool:
        m = self.regex.search(path) if self.anywhere else self.regex.match(path)
        return m is not None


@dataclass
class PathMatcher:
    patterns: list[Pattern] = field(default_factory=list)

    @classmethod
    def parse(cls, texts: list[str]) -> PathMatcher:
        return cls([Pattern.parse(t) for t in texts])

    def __call__(self, path: str) -> bool:
        """True if any pattern matches ``path`` (every matching one counts a hit)."""
        hit = False
        for p in self.patterns:
            if p.match(path):
                p.hits += 1
                hit = True
        return hit

    def unmatched(self) -> list[str]:
        return [p.text for p in self.patterns if not p.hits]

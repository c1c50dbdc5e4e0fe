"""Real voices for false-event tests: the recordings of Debian's ``klettres-data``.

KLettres (a KDE alphabet game, GPL-2+) ships people saying letters and syllables in 20-odd
languages, ``/usr/share/klettres/<lang>/<alpha|syllab>/<name>.ogg`` (1,836 files in 2.x). They
are the only real speech here, and isolated held vowels and nasals are what sets a sound tagger
off ("Animal", "Insect"), so the sound-event thresholds are tuned on them.

**The split** is by file and fixed (it depends on nothing but the file's place in the
package): a file is ``dev`` when the SHA-1 of its path relative to the KLettres directory
(``"en/alpha/A.ogg"``, UTF-8, ``/`` separators) is odd, read as a hexadecimal number, and
``test`` when it is even. Tune thresholds on ``dev`` (``salmonn-live bench sounds
--speech-split dev``); report on ``test`` (the bench's default).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from training.gcompris import Split

KLETTRES_DIR = Path("/usr/share/klettres")
"""Where Debian's ``klettres-data`` installs the recordings (`dpkg -L klettres-data`)."""


def split_of(relative_path: str) -> Split:
    """The split of one file, from its path relative to the KLettres directory.

    Args:
        relative_path: ``"<lang>/<alpha|syllab>/<name>.ogg"``, ``/``-separated.
    """
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()
    return "dev" if int(digest, 16) % 2 else "test"


def klettres_files(split: Split | None = None, root: Path = KLETTRES_DIR) -> list[Path]:
    """The recordings under ``root`` of one split (None: every file), sorted by path.

    Returns an empty list when ``klettres-data`` is not installed.
    """
    files = sorted(Path(root).glob("*/*/*.ogg"))
    if split is None:
        return files
    return [f for f in files if split_of(f.relative_to(root).as_posix()) == split]

"""Only our own code in the repository: no tracked file carries another project's copyright or
licence header (issue 25). The one licence text we hold is ours, in ``LICENSE``.

A copied file usually brings its notice along (or gains one when someone adds it "properly", with
the original licence). So each tracked text file is searched, case-insensitively and with any white
space or comment markers between the words, for the phrases such notices are made of
(``NOTICE_PATTERNS``): an SPDX licence tag with its colon; the word copyright followed by (c), ©
or a year, or © followed by a year; the reserved-rights phrase; and the grant and
disclaimer sentences of the common licences (MIT, BSD, Apache, the GPL family, Creative Commons).

Not flagged, on purpose: naming a licence or a licensed thing in a sentence ("the data set's
licence", "MIT", "GPL-3.0", ``license = { file = "LICENSE" }`` in pyproject.toml), which is what our
README and metadata do. The patterns are written with ``\\s`` between words and the planted samples
below with ``~`` (turned into spaces when used), so this file does not match itself.
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUR_LICENCE = {"LICENSE"}  # the project's own licence text, allowed by path

NOTICE_PATTERNS = {
    "SPDX tag": r"SPDX-License-Identifier\s*:",
    "copyright line": r"\bcopyright\s*(\(c\)|©|\d{4})",
    "copyright sign and year": r"©\s*\d{4}",
    "reserved rights": r"\ball\s+rights\s+reserved\b",
    "MIT grant": r"\bpermission\s+is\s+hereby\s+granted\b",
    "as-is disclaimer": r"\bprovided\s+[\"'`]?as\s+is[\"'`]?,?\s+without\s+warranty",
    "BSD conditions": r"\bredistribution\s+and\s+use\s+in\s+source\s+and\s+binary\s+forms\b",
    "Apache grant": r"\blicensed\s+(under\s+the\s+apache\s+license|to\s+the\s+apache\s+software\s+foundation)\b",
    "GPL grant": r"\byou\s+can\s+redistribute\s+it\s+and/or\s+modify\b",
    "GPL disclaimer": r"\bwithout\s+any\s+warranty\b",
    "Creative Commons": r"\bthis\s+work\s+is\s+licensed\s+under\b",
}
_NOTICE = re.compile("|".join(f"(?P<p{i}>{p})" for i, p in enumerate(NOTICE_PATTERNS.values())), re.IGNORECASE)
_COMMENT_MARKS = re.compile(r"^[ \t]*(#+|//+|/?\*+|--|;+|%+|<!--)[ \t]?", re.MULTILINE)


def notices(text: str):
    """[(line number, pattern name, matched text)] of the licence-notice phrases in ``text``; comment
    markers at line starts are taken out first, so a phrase broken over comment lines still matches."""
    plain = _COMMENT_MARKS.sub("", text)
    names = list(NOTICE_PATTERNS)
    found = []
    for m in _NOTICE.finditer(plain):
        which = names[int(next(k for k, v in m.groupdict().items() if v is not None)[1:])]
        found.append((plain.count("\n", 0, m.start()) + 1, which, " ".join(m.group().split())))
    return found


def tracked_text_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if not name or name in OUR_LICENCE or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # images and other binary files
        yield name, data.decode("utf-8", errors="replace")


def test_no_tracked_file_carries_another_projects_licence_notice():
    files = dict(tracked_text_files())
    assert "README.md" in files and "iconmatting_core/postprocess.py" in files  # the listing worked
    found = [f"{name}:{line}: {which}: {text!r}" for name, text in files.items() for line, which, text in notices(text)]
    assert not found, ("Another project's copyright or licence text is in the repository; write the code "
                       "ourselves and keep only facts (see tests/unit/test_own_code.py):\n" + "\n".join(found))


def test_our_licence_is_the_only_notice_and_is_found_as_one():
    assert {which for _, which, _ in notices((ROOT / "LICENSE").read_text())} >= {"copyright line", "MIT grant"}


@pytest.mark.parametrize("planted, which", [
    ("# SPDX-License-Identifier~: Apache-2.0\nimport torch\n", "SPDX tag"),
    ("# Copyright~(c) Meta Platforms, Inc. and affiliates.\n", "copyright line"),
    ("// Copyright~2023 The Authors\n", "copyright line"),
    ("/* ©~2021 Someone */\n", "copyright sign and year"),
    ("# All~rights\n# reserved.\n", "reserved rights"),
    ('"""Permission~is~hereby~granted, free of charge, to any person\n', "MIT grant"),
    ('# THE SOFTWARE IS PROVIDED "AS~IS", WITHOUT~WARRANTY OF ANY KIND\n', "as-is disclaimer"),
    ("# Redistribution~and~use~in~source~and~binary~forms, with or without\n", "BSD conditions"),
    ("# Licensed~under~the~Apache~License, Version 2.0 (the \"License\");\n", "Apache grant"),
    ("# This program is free software: you~can~redistribute~it~and/or~modify\n", "GPL grant"),
    ("# but WITHOUT~ANY~WARRANTY; without even the implied warranty of\n", "GPL disclaimer"),
    ("<!-- This~work~is~licensed~under a Creative Commons licence -->\n", "Creative Commons"),
])
def test_planted_notices_are_found(planted, which):
    found = notices("x = 1\n" + planted.replace("~", " "))
    assert [(line, w) for line, w, _ in found] == [(2, which)]  # found once, on the line it starts on
    assert notices(planted) == []  # as written here (with ~) it is not one


def test_sentences_naming_licences_are_not_notices():
    fine = [
        "**Recipes with public data** (check each licence before use; neither data set ships with this pack):",
        'license = { file = "LICENSE" }',
        "The authors' code (tiny-smart/in-context-matting) is MIT; ComfyUI is GPL-3.0: read it, never copy.",
        "The data set is licensed for research use only.",
        "Copyright and licence questions: see LICENSE.",
        "# the copyright of the photos stays with their owners",
    ]
    assert [notices(line) for line in fine] == [[] for _ in fine]

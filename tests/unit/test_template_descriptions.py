"""The template cards' sentences (``web/template_descriptions.json``, written on the cards by
``web/template_descriptions.js``; the browser test checks them drawn whole on the cards)."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTIONS = json.loads((ROOT / "web" / "template_descriptions.json").read_text())


def test_every_template_has_a_one_sentence_description():
    """One sentence per workflow (two lines on a card: 66 characters fit in 1.45.21 and 1.58.1 at 1920 px),
    each its own, none the title again."""
    assert sorted(DESCRIPTIONS) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    for name, sentence in DESCRIPTIONS.items():
        assert sentence.endswith(".") and sentence.count(". ") == 0 and "\n" not in sentence, sentence
        assert 30 <= len(sentence) <= 66 and sentence.rstrip(".").lower() != name.lower(), sentence
    assert len(set(DESCRIPTIONS.values())) == len(DESCRIPTIONS)

"""Finding the nodes by the words users type, in the real node search of ComfyUI 0.3.75's pinned frontend
(1.32.9) in Chromium. That frontend knows no ``search_aliases``: it searches only node ids and display
names (Fuse, threshold 0.3, a word counting only within the first ~30 characters), so the display names
must carry the words. The app runs in the 0.3.75 server the other browser tests use (``tests/browser/conftest.py``),
on a page of its own. Skipped when Chromium or Playwright is missing, except in CI (``CI=true``), where that fails."""
import pytest

from frontend_harness import PINNED, ComfyApp, config_id

#: word typed -> a node it must find (display names, as the search box lists them)
EXPECTED = {
    "remove background": "IconMatting 5 · Remove Background",
    "cutout": "IconMatting 6 · Composite Cutouts",
    "cut out": "IconMatting 6 · Composite Cutouts",
    "alpha": "IconMatting 5 · Remove Background",  # its id is IconMattingDecodeAlpha
    "matting": "IconMatting 1 · Load",
    "iconmatting": "IconMatting 4 · Match Targets",
}
OLDEST = [c for c in PINNED if c[0] == "0.3.75"]


@pytest.fixture(scope="module")
def search(app, browser):
    """search(words) -> display names the node search box lists for them."""
    page_app = ComfyApp(browser, app[0].server)
    page_app.open()
    page = page_app.page

    def run(words):
        page.evaluate("() => app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")  # as a double-click
        box = page.locator("input[id^=comfy-vue-node-search-box-input]").first
        box.wait_for(timeout=10000)
        box.fill(words)
        page.wait_for_timeout(1000)  # the box's debounce
        found = [" ".join(t.split()) for t in page.locator(".option-display-name").all_inner_texts()]
        page.keyboard.press("Escape")
        box.wait_for(state="hidden", timeout=10000)
        return found

    yield run
    page_app.context.close()


@pytest.mark.parametrize("app", OLDEST, ids=[config_id(c) for c in OLDEST], indirect=True)
@pytest.mark.parametrize("words", sorted(EXPECTED))
def test_the_words_users_type_find_the_nodes(search, words):
    found = search(words)
    assert any(EXPECTED[words] in text for text in found), (words, found[:20])

"""Finding the nodes by the words users type, in the real node search in Chromium:

* ComfyUI 0.3.75's pinned frontend (1.32.9) knows no ``search_aliases``: it searches only node ids and
  display names (Fuse, threshold 0.3, a word counting only within the first ~30 characters), so the
  display names must carry the words;
* the newest frontend (:data:`frontend_harness.NEWEST_FRONTEND`, on ComfyUI 0.28.2) searches
  ``search_aliases`` too: each node carries only the words of its own job, so a search for the task
  lists the node that does it, not the whole pack.

Each runs in the server the other browser tests use for that configuration (``tests/browser/conftest.py``),
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


#: word typed -> the pack's nodes the newest frontend lists for it, in its order
NEWEST_EXPECTED = {
    "background removal": ["IconMatting 5 · Remove Background"],
    "alpha matte": ["IconMatting 5 · Remove Background"],
    "replace background": ["IconMatting 6 · Composite Cutouts"],
    "load images": ["IconMatting 3 · Load Image Folder"],
}
#: the search box of each frontend: (its input, one element per listed node, holding the display name first)
SEARCH_BOXES = {
    "v1": ("input[id^=comfy-vue-node-search-box-input]", ".option-display-name"),
    "v2": ("[role=dialog] input", "[data-testid=result-item]"),  # 1.5x's default box
}


def _search_box(browser, server, box):
    """search(words) -> display names the node search box lists for them."""
    field, item = SEARCH_BOXES[box]
    page_app = ComfyApp(browser, server)
    page_app.open()
    page = page_app.page

    def run(words):
        page.evaluate("() => app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")  # as a double-click
        entry = page.locator(field).first
        entry.wait_for(timeout=10000)
        entry.fill(words)
        page.wait_for_timeout(1000)  # the box's debounce
        found = [" ".join(t.split()) for t in page.locator(item).all_inner_texts()]
        page.keyboard.press("Escape")
        entry.wait_for(state="hidden", timeout=10000)
        return found

    yield run
    page_app.context.close()


@pytest.fixture(scope="module")
def search(app, browser):
    yield from _search_box(browser, app[0].server, "v1")


@pytest.fixture(scope="module")
def newest_search(newest_app, browser):
    yield from _search_box(browser, newest_app[0].server, "v2")


@pytest.mark.parametrize("app", OLDEST, ids=[config_id(c) for c in OLDEST], indirect=True)
@pytest.mark.parametrize("words", sorted(EXPECTED))
def test_the_words_users_type_find_the_nodes(search, words):
    found = search(words)
    assert any(EXPECTED[words] in text for text in found), (words, found[:20])


@pytest.mark.parametrize("words", sorted(NEWEST_EXPECTED))
def test_each_node_is_found_by_the_words_of_its_own_job(newest_search, words):
    listed = [text for text in newest_search(words) if text.startswith("IconMatting")]
    pack_nodes = [next(n for n in ALL_NODES if text.startswith(n)) for text in listed]
    assert pack_nodes == NEWEST_EXPECTED[words], (words, listed)


ALL_NODES = ["IconMatting 1 · Load", "IconMatting 2 · Encode Reference", "IconMatting 2 · Load Context",
             "IconMatting 2 · Save Context", "IconMatting 3 · Load Image Folder", "IconMatting 4 · Match Targets",
             "IconMatting 5 · Remove Background", "IconMatting 6 · Composite Cutouts"]

"""Finding the nodes by the words users type, in the real node search of ComfyUI 0.3.75's pinned frontend
(1.32.9) in Chromium. That frontend knows no ``search_aliases``: it searches only node ids and display
names (Fuse, threshold 0.3, a word counting only within the first ~30 characters), so the display names
must carry the words. Skipped when Chromium or Playwright is missing, except in CI (``CI=true``), where
that fails."""
import pytest

from frontend_harness import ComfyApp, ComfyServer, launch_browser, prepare_user, require_browser

#: word typed -> a node it must find (display names, as the search box lists them)
EXPECTED = {
    "remove background": "IconMatting 5 · Remove Background",
    "cutout": "IconMatting 6 · Composite Cutouts",
    "cut out": "IconMatting 6 · Composite Cutouts",
    "alpha": "IconMatting 5 · Remove Background",  # its id is IconMattingDecodeAlpha
    "matting": "IconMatting 1 · Load",
    "iconmatting": "IconMatting 4 · Match Targets",
}


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """search(words) -> display names the node search box lists for them."""
    require_browser()
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("search")
    prepare_user(work)
    with ComfyServer(work) as server, sync_playwright() as playwright:
        browser = launch_browser(playwright)
        app = ComfyApp(browser, server)
        app.open()
        page = app.page

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
        browser.close()


@pytest.mark.parametrize("words", sorted(EXPECTED))
def test_the_words_users_type_find_the_nodes(search, words):
    found = search(words)
    assert any(EXPECTED[words] in text for text in found), (words, found[:20])

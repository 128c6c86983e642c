// IconMatting: one sentence on each of the pack's cards in ComfyUI's template browser.
//
// ComfyUI's frontends give a custom node pack's template no description of its own: each is
// {name, title: name, description: name} (read from their sources, 1.32 to 1.58), so 1.32 and 1.45
// repeat the file name under the title and 1.58 shows the title alone. This extension writes the
// sentence that ./template_descriptions.json gives a template on its card: in place of the repeated
// name where the card shows one, else as a line under the title. A card it does not find (another
// layout) is left as the frontend drew it.
const DESCRIPTIONS = new URL("./template_descriptions.json", import.meta.url);
const MARK = "data-iconmatting-description";
const CARD = '[data-testid^="template-workflow-"]';

async function load() {
  try {
    const response = await fetch(DESCRIPTIONS);
    return response.ok ? await response.json() : {};
  } catch {
    return {};
  }
}

function describe(card, sentence) {
  const title = card.querySelector("h3");
  if (!title) return;
  let line = card.querySelector(`[${MARK}]`);
  if (!line) {
    // the frontend's own description of a custom template: its name, with - and _ read as spaces
    const name = title.textContent.trim().replace(/[-_]/g, " ");
    line = [...card.querySelectorAll("p")].find((p) => p.textContent.trim() === name);
    if (!line) {
      line = document.createElement("p");
      line.className = "m-0 line-clamp-2 text-sm text-muted-foreground";
      title.after(line);
    }
    line.setAttribute(MARK, "");
  }
  if (line.textContent !== sentence) {
    // the text node itself, so that the frontend's own rendering keeps its node (and leaves ours alone)
    if (line.firstChild?.nodeType === Node.TEXT_NODE && line.childNodes.length === 1) line.firstChild.nodeValue = sentence;
    else line.textContent = sentence;
  }
  if (line.title !== sentence) line.title = sentence;
}

const descriptions = await load();
const prefix = "template-workflow-";
let pending = false;

function update() {
  pending = false;
  for (const card of document.querySelectorAll(CARD)) {
    const sentence = descriptions[card.dataset.testid.slice(prefix.length)];
    if (sentence) describe(card, sentence);
  }
}

if (Object.keys(descriptions).length) {
  new MutationObserver(() => {
    if (!pending && document.querySelector(CARD)) {
      pending = true;
      requestAnimationFrame(update);
    }
  }).observe(document.body, { childList: true, subtree: true });
}

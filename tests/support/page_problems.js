// Run in a page by support.browser.page_problems: what a person would trip over there.
// Contrast per WCAG 2.1 (4.5:1 for body text, 3:1 for large text), against the first
// opaque background up the tree.
() => {
  const problems = [];
  const root = document.documentElement;
  if (root.scrollWidth > root.clientWidth) {
    problems.push(`the page scrolls sideways: ${root.scrollWidth} px wide in ${root.clientWidth} px`);
  }
  const visible = (el) => {
    const box = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    return box.width > 0 && box.height > 0 && style.visibility !== "hidden" && style.display !== "none";
  };
  for (const el of document.querySelectorAll("input, select, textarea")) {
    if (el.type === "hidden") continue;
    const named = el.labels && el.labels.length > 0 || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby");
    if (!named) problems.push(`no label: ${el.outerHTML.slice(0, 80)}`);
  }
  for (const el of document.querySelectorAll("button, a")) {
    if (!visible(el)) continue;
    const text = (el.innerText || el.getAttribute("aria-label") || el.title || "").trim();
    if (!text) problems.push(`no text: ${el.outerHTML.slice(0, 80)}`);
  }
  for (const el of document.querySelectorAll("audio")) {
    if (!el.getAttribute("aria-label") && !el.getAttribute("aria-labelledby")) {
      problems.push(`player without a name: ${el.outerHTML.slice(0, 80)}`);
    }
  }
  const rgba = (text) => {
    const m = text.match(/rgba?\(([^)]+)\)/);
    if (!m) return null;
    const p = m[1].split(",").map((x) => parseFloat(x));
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const luminance = (c) => {
    const ch = [c.r, c.g, c.b].map((v) => {
      const s = v / 255;
      return s <= 0.03928 ? s / 12.92 : Math.pow((s + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * ch[0] + 0.7152 * ch[1] + 0.0722 * ch[2];
  };
  const background = (el) => {
    for (let node = el; node; node = node.parentElement) {
      const c = rgba(getComputedStyle(node).backgroundColor);
      if (c && c.a >= 0.99) return c;
    }
    return { r: 255, g: 255, b: 255, a: 1 };
  };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const checked = new Set();
  while (walker.nextNode()) {
    const text = walker.currentNode.textContent.trim();
    const el = walker.currentNode.parentElement;
    if (!text || !el || checked.has(el) || !visible(el)) continue;
    checked.add(el);
    const style = getComputedStyle(el);
    const fg = rgba(style.color);
    if (!fg) continue;
    const bg = background(el);
    const [l1, l2] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
    const ratio = (l1 + 0.05) / (l2 + 0.05);
    const size = parseFloat(style.fontSize);
    const bold = parseInt(style.fontWeight, 10) >= 700;
    const large = size >= 24 || (bold && size >= 18.66);
    if (ratio < (large ? 3 : 4.5)) {
      problems.push(`contrast ${ratio.toFixed(2)}:1 for "${text.slice(0, 40)}" (${style.color} on rgb(${bg.r}, ${bg.g}, ${bg.b}))`);
    }
  }
  return problems;
}

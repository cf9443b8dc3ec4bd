// Markdown for model output, which is untrusted. Every character taken from the source is
// HTML-escaped before any markup is added; the markup added is a fixed set of tags, and the only
// attribute value taken from the source is a link's href, kept only for http:// and https://.
// Pieces already rendered (code, links) are held aside as \u0000N\u0000 tokens, which the source
// can never contain (NULs are dropped first) and which no URL pattern below may swallow.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Quotes and lists nest by recursion: bounded, so a hostile answer cannot recurse deeply.
const MAX_DEPTH = 8;

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$/;

export function renderMarkdown(source) {
  const lines = String(source)
    .replace(/\u0000/g, "")
    .replace(/\r\n?/g, "\n")
    .split("\n")
    .map((line) => line.replace(/^\t+/, (tabs) => "    ".repeat(tabs.length)));
  return renderBlocks(lines, 0);
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

function isTableStart(lines, i) {
  return lines[i].includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("|");
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line)
    || isTableStart(lines, i);
}

function renderBlocks(lines, depth) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i++;
    } else if ((match = FENCE.exec(line))) {
      i = fencedCode(lines, i, match, out);
    } else if ((match = HEADING.exec(line))) {
      const level = match[1].length;
      out.push(`<h${level}>${inline(match[2])}</h${level}>`);
      i++;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
        body.push(match[1]);
        i++;
      }
      out.push(`<blockquote>${depth < MAX_DEPTH ? renderBlocks(body, depth + 1) : paragraph(body)}</blockquote>`);
    } else if (ITEM.test(line)) {
      i = list(lines, i, depth, out);
    } else if (isTableStart(lines, i)) {
      i = table(lines, i, out);
    } else {
      const body = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) body.push(lines[i++]);
      out.push(paragraph(body));
    }
  }
  return out.join("\n");
}

function fencedCode(lines, i, match, out) {
  const marker = match[1];
  const closing = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}\\s*$`);
  const body = [];
  i++;
  while (i < lines.length && !closing.test(lines[i])) body.push(lines[i++]);
  // Past the end means the answer is still streaming: show what has come so far as code.
  const language = match[2] ? ` class="language-${escapeHtml(match[2])}"` : "";
  out.push(`<pre><code${language}>${escapeHtml(body.join("\n"))}</code></pre>`);
  return i + 1;
}

function list(lines, i, depth, out) {
  const first = ITEM.exec(lines[i]);
  const base = first[1].length;
  const ordered = /\d/.test(first[2]);
  const isSibling = (line) => {
    const match = ITEM.exec(line);
    return match !== null && match[1].length < base + 2 && /\d/.test(match[2]) === ordered;
  };
  const items = [];
  let loose = false;
  while (i < lines.length && isSibling(lines[i])) {
    const match = ITEM.exec(lines[i]);
    const column = match[1].length + match[2].length + 1;
    const body = [match[3]];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        let next = i;
        while (next < lines.length && !lines[next].trim()) next++;
        if (next < lines.length && indentOf(lines[next]) >= base + 2) {
          for (; i < next; i++) body.push("");
          loose = true;
          continue;
        }
        if (next < lines.length && isSibling(lines[next])) {
          loose = true;
          i = next;
        }
        break;
      }
      if (indentOf(line) >= base + 2) {
        body.push(line.slice(Math.min(indentOf(line), column)));
      } else if (startsBlock(lines, i)) {
        break;
      } else {
        body.push(line); // a lazy continuation of the item's paragraph
      }
      i++;
    }
    items.push(body);
  }
  const rendered = items.map((body) => {
    let html = depth < MAX_DEPTH ? renderBlocks(body, depth + 1) : paragraph(body);
    // A tight list shows its items' first paragraphs without <p> margins. Only our own tags can
    // match here: any "<p>" from the source was escaped long before.
    if (!loose) html = html.replace(/^<p>([\s\S]*?)<\/p>/, "$1");
    return `<li>${html}</li>`;
  });
  const start = ordered ? parseInt(first[2], 10) : 1;
  const open = ordered ? (start !== 1 ? `<ol start="${start}">` : "<ol>") : "<ul>";
  out.push(`${open}${rendered.join("")}${ordered ? "</ol>" : "</ul>"}`);
  return i;
}

function splitCells(line) {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  const cells = [];
  let current = "";
  for (let k = 0; k < text.length; k++) {
    if (text[k] === "\\" && text[k + 1] === "|") {
      current += "|";
      k++;
    } else if (text[k] === "|") {
      cells.push(current.trim());
      current = "";
    } else {
      current += text[k];
    }
  }
  cells.push(current.trim());
  return cells;
}

function table(lines, i, out) {
  const header = splitCells(lines[i]);
  const aligns = splitCells(lines[i + 1]).map((cell) => {
    if (cell.startsWith(":") && cell.endsWith(":")) return ' class="align-center"';
    if (cell.endsWith(":")) return ' class="align-right"';
    return "";
  });
  const row = (cells, tag) => "<tr>" + header.map((_, k) => `<${tag}${aligns[k] || ""}>${inline(cells[k] || "")}</${tag}>`).join("") + "</tr>";
  const body = [];
  i += 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|")) body.push(row(splitCells(lines[i++]), "td"));
  out.push(`<div class="table-wrap"><table><thead>${row(header, "th")}</thead><tbody>${body.join("")}</tbody></table></div>`);
  return i;
}

function paragraph(lines) {
  return `<p>${inline(lines.map((line) => line.trim()).join("\n"))}</p>`;
}

const PLACEHOLDER = /\u0000(\d+)\u0000/g;
const SAFE_URL = /^https?:\/\//i;

function inline(text) {
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  // Code spans first: nothing inside them is markup.
  let html = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => {
    const trimmed = /^ .* $/s.test(code) && code.trim() ? code.slice(1, -1) : code;
    return hold(`<code>${escapeHtml(trimmed)}</code>`);
  });
  html = escapeHtml(html);
  // [text](url): a link only for http(s); anything else (javascript:, data:, relative) stays text.
  html = html.replace(/\[([^\]\n]+)\]\(\s*([^\s\u0000]+?)(?:\s+&quot;[^\u0000]*?&quot;)?\s*\)/g, (whole, label, url) =>
    SAFE_URL.test(url) ? hold(`<a href="${url}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`) : whole);
  // Bare URLs; escaping left "&amp;" as the only entity a URL may contain.
  html = html.replace(/\bhttps?:\/\/(?:[^\s\u0000&]|&amp;)+/gi, (url) => {
    const trail = /(?:[.,;:!?)\]]|&amp;)+$/.exec(url);
    const link = trail ? url.slice(0, trail.index) : url;
    const rest = trail ? trail[0] : "";
    if (!/^https?:\/\/./i.test(link)) return url;
    return hold(`<a href="${link}" target="_blank" rel="noopener noreferrer">${link}</a>`) + rest;
  });
  html = emphasis(html).replace(/\n/g, "<br>\n");
  const restore = (part) => part.replace(PLACEHOLDER, (_, n) => restore(held[Number(n)]));
  return restore(html);
}

function emphasis(html) {
  return html
    .replace(/\*\*(\S(?:[\s\S]*?\S)?)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|\W)__(\S(?:[\s\S]*?\S)?)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/\*([^\s*](?:[^*]*?[^\s*])?)\*/g, "<em>$1</em>")
    .replace(/(^|\W)_([^\s_](?:[^_]*?[^\s_])?)_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(\S(?:[\s\S]*?\S)?)~~/g, "<del>$1</del>");
}

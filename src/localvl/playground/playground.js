// The playground page: a chat with the served model over the public API. Model text reaches the
// DOM only as textContent, or as the escaping-first Markdown of markdown.js.

import { listModels, streamMessage } from "./api.js";
import { applyLanguage, initialLanguage, saveLanguage } from "./i18n.js";
import { renderMarkdown } from "./markdown.js";
import { curlSnippet, pythonSnippet, requestBody } from "./snippets.js";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "localvl.apiKey";
const MODEL_STORAGE = "localvl.model";
const ACCEPTED = new Set(["image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"]);
const DEFAULT_MAX_TOKENS = 1024;

const state = {
  language: initialLanguage(),
  t: (key) => key,
  turns: [], // the conversation so far, as the next request will send it
  lastTurns: null, // what the last request sent: the snippet's subject while the composer is empty
  attachments: [], // [{kind: "file", name, mediaType, data, url}]
  controller: null,
  snippetTab: "python",
  notice: null, // {key, detail}: kept so a language switch can translate it
  objectUrls: [],
};
const statsOf = new WeakMap();

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- language ----------------------------------------------------------------------------------

function setLanguage(language) {
  state.language = language;
  state.t = applyLanguage(document, language);
  for (const node of document.querySelectorAll(".stats")) renderStats(node);
  renderNotice();
  updateSnippet();
}

// ---- notices -----------------------------------------------------------------------------------

function showNotice(key, detail) {
  state.notice = { key, detail };
  renderNotice();
}

function hideNotice() {
  state.notice = null;
  renderNotice();
}

function renderNotice() {
  const notice = $("notice");
  notice.hidden = !state.notice;
  if (state.notice) notice.textContent = state.t(state.notice.key) + (state.notice.detail ? ` (${state.notice.detail})` : "");
}

function apiKey() {
  return $("api-key").value.trim();
}

// A failed call's words for the user: key problems point at the key field.
function describeError(error) {
  if (error.status === 401) {
    $("api-key").classList.add("attention");
    $("api-key").focus();
    return { key: apiKey() ? "badKey" : "needKey" };
  }
  if (error.status === 0 && error.type === "network_error") return { key: "networkError" };
  return { text: `${error.type}: ${error.message}` };
}

// ---- models ------------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  try {
    const ids = await listModels(apiKey());
    const wanted = select.value || localStorage.getItem(MODEL_STORAGE);
    select.replaceChildren(...ids.map((id) => {
      const option = element("option", "", id);
      option.value = id;
      return option;
    }));
    if (ids.includes(wanted)) select.value = wanted;
    $("api-key").classList.remove("attention");
    if (state.notice && ["needKey", "badKey", "networkError", "requestFailed", "noModels"].includes(state.notice.key)) {
      hideNotice();
    }
    if (!ids.length) showNotice("noModels");
  } catch (error) {
    const problem = describeError(error);
    if (problem.key) showNotice(problem.key);
    else showNotice("requestFailed", problem.text);
  }
  updateSnippet();
}

// ---- attachments -------------------------------------------------------------------------------

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    if (!ACCEPTED.has(file.type)) {
      showNotice("unsupportedFile");
      continue;
    }
    try {
      const data = await readBase64(file);
      const url = file.type.startsWith("image/") ? URL.createObjectURL(file) : null;
      if (url) state.objectUrls.push(url);
      state.attachments.push({ kind: "file", name: file.name || "file", mediaType: file.type, data, url });
    } catch {
      showNotice("readFailed");
    }
  }
  renderAttachments();
  updateSnippet();
}

function fileView(part) {
  const chip = element("span", "file");
  if (part.url) {
    const image = element("img");
    image.src = part.url;
    image.alt = part.name;
    chip.append(image);
  } else {
    chip.append(element("span", "badge", "PDF"));
  }
  chip.append(element("span", "name", part.name));
  return chip;
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren(...state.attachments.map((part, index) => {
    const item = element("li");
    const remove = element("button", "remove", "×");
    remove.type = "button";
    remove.dataset.i18nAriaLabel = "remove";
    remove.setAttribute("aria-label", state.t("remove"));
    remove.addEventListener("click", () => {
      state.attachments.splice(index, 1);
      renderAttachments();
      updateSnippet();
    });
    item.append(fileView(part), remove);
    return item;
  }));
}

// ---- the conversation --------------------------------------------------------------------------

function draftTurn() {
  const text = $("prompt").value.trim();
  if (!text && !state.attachments.length) return null;
  const parts = [...state.attachments];
  if (text) parts.push({ kind: "text", text });
  return { role: "user", parts };
}

function maxTokens() {
  const value = parseInt($("max-tokens").value, 10);
  return Number.isFinite(value) && value > 0 ? value : DEFAULT_MAX_TOKENS;
}

// Empty means the server's default; the API takes 0 to 1.
function temperature() {
  const value = parseFloat($("temperature").value);
  return Number.isFinite(value) ? Math.min(Math.max(value, 0), 1) : null;
}

function requestFor(turns) {
  return { model: $("model").value || "MODEL", maxTokens: maxTokens(), temperature: temperature(),
           system: $("system").value.trim(), turns };
}

function currentRequest() {
  const draft = draftTurn();
  const turns = draft ? [...state.turns, draft]
    : state.lastTurns ?? [{ role: "user", parts: [{ kind: "text", text: state.t("exampleQuestion") }] }];
  return requestFor(turns);
}

function roleLabel(key) {
  const label = element("div", "role", state.t(key));
  label.dataset.i18n = key;
  return label;
}

function appendUser(turn) {
  const item = element("li", "msg user");
  item.append(roleLabel("you"));
  const files = turn.parts.filter((part) => part.kind === "file");
  if (files.length) {
    const row = element("div", "files");
    row.append(...files.map(fileView));
    item.append(row);
  }
  const text = turn.parts.filter((part) => part.kind === "text").map((part) => part.text).join("\n");
  if (text) item.append(element("div", "text", text));
  $("log").append(item);
  $("empty").hidden = true;
}

function appendAssistant() {
  const item = element("li", "msg assistant");
  item.dataset.state = "streaming";
  const thinking = element("details", "thinking");
  thinking.hidden = true;
  const summary = element("summary", "", state.t("thinking"));
  summary.dataset.i18n = "thinking";
  const thinkingText = element("div", "thinking-text");
  thinking.append(summary, thinkingText);
  const markdown = element("div", "markdown");
  const stats = element("div", "stats");
  const error = element("div", "error");
  error.hidden = true;
  item.append(roleLabel("assistant"), thinking, markdown, stats, error);
  $("log").append(item);

  let text = "";
  let scheduled = false;
  const render = () => {
    scheduled = false;
    markdown.innerHTML = renderMarkdown(text); // escaping-first: see markdown.js
    item.scrollIntoView({ block: "nearest" });
  };
  return {
    addText(delta) {
      text += delta;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(render);
      }
    },
    addThinking(delta) {
      thinking.hidden = false;
      thinkingText.textContent += delta;
    },
    text: () => text,
    finish(result, stateName) {
      render();
      item.dataset.state = stateName;
      statsOf.set(stats, result);
      renderStats(stats);
    },
    fail(message) {
      render();
      item.dataset.state = "error";
      error.hidden = false;
      error.textContent = message;
    },
  };
}

function renderStats(node) {
  const result = statsOf.get(node);
  if (!result) return;
  const t = state.t;
  const parts = [];
  if (result.stopped) parts.push(t("stopped"));
  if (result.ttftMs !== null && result.ttftMs !== undefined) parts.push(`${t("ttft")} ${Math.round(result.ttftMs)} ms`);
  if (result.tokensPerSecond) parts.push(`${result.tokensPerSecond.toFixed(1)} ${t("tokensPerSecond")}`);
  if (result.outputTokens !== undefined) parts.push(`${result.outputTokens} ${t("tokens")}`);
  if (result.stopReason && result.stopReason !== "end_turn") parts.push(`${t("stopReason")}: ${result.stopReason}`);
  node.textContent = parts.join(" · ");
}

// An answer joins the history only with its text: an empty one leaves the user's turn alone,
// which the API merges with the next.
function withAnswer(turns, text) {
  return text ? [...turns, { role: "assistant", parts: [{ kind: "text", text }] }] : turns;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;
  const draft = draftTurn();
  if (!draft) {
    $("prompt").focus();
    return;
  }
  if (!$("model").value) await loadModels();
  if (!$("model").value) return;
  hideNotice();
  const turns = [...state.turns, draft];
  const request = requestFor(turns);
  const prompt = $("prompt").value;
  state.lastTurns = turns;
  appendUser(draft);
  const view = appendAssistant();
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();
  setBusy(true);
  state.controller = new AbortController();
  try {
    const result = await streamMessage(apiKey(), requestBody(request), {
      onText: view.addText,
      onThinking: view.addThinking,
      signal: state.controller.signal,
    });
    view.finish(result, "done");
    state.turns = withAnswer(turns, view.text());
  } catch (error) {
    if (error.name === "AbortError") {
      view.finish({ stopped: true }, "stopped");
      state.turns = withAnswer(turns, view.text());
    } else {
      const problem = describeError(error);
      view.fail(problem.key ? state.t(problem.key) : problem.text);
      if (problem.key) showNotice(problem.key);
      // Give the question back, so it can be sent again once the problem is fixed.
      if (!$("prompt").value && !state.attachments.length) {
        $("prompt").value = prompt;
        state.attachments = draft.parts.filter((part) => part.kind === "file");
        renderAttachments();
      }
    }
  } finally {
    state.controller = null;
    setBusy(false);
    updateSnippet();
  }
}

function newChat() {
  state.controller?.abort();
  state.turns = [];
  state.lastTurns = null;
  const keep = new Set(state.attachments.map((part) => part.url));
  for (const url of state.objectUrls) if (!keep.has(url)) URL.revokeObjectURL(url);
  state.objectUrls = state.objectUrls.filter((url) => keep.has(url));
  $("log").replaceChildren();
  $("empty").hidden = false;
  hideNotice();
  updateSnippet();
  $("prompt").focus();
}

// ---- the code panel ----------------------------------------------------------------------------

function updateSnippet() {
  const request = currentRequest();
  const text = state.snippetTab === "python"
    ? pythonSnippet(location.origin, request)
    : curlSnippet(location.origin, request);
  $("snippet").textContent = text;
}

function selectTab(tab) {
  state.snippetTab = tab;
  $("tab-python").setAttribute("aria-selected", String(tab === "python"));
  $("tab-curl").setAttribute("aria-selected", String(tab === "curl"));
  updateSnippet();
}

async function copySnippet() {
  const text = $("snippet").textContent;
  try {
    await navigator.clipboard.writeText(text);
    const button = $("copy");
    button.textContent = state.t("copied");
    setTimeout(() => { button.textContent = state.t("copy"); }, 1500);
  } catch {
    // No clipboard (an insecure origin): select the code for a manual copy instead.
    const range = document.createRange();
    range.selectNodeContents($("snippet"));
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
}

// ---- wiring ------------------------------------------------------------------------------------

function wireDragAndDrop() {
  const overlay = $("drop");
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) overlay.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    overlay.hidden = true;
    if (!hasFiles(event)) return;
    event.preventDefault();
    addFiles(Array.from(event.dataTransfer.files));
  });
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData?.files || []);
    if (!files.length) return;
    event.preventDefault();
    addFiles(files);
  });
}

function start() {
  setLanguage(state.language);
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, apiKey());
    loadModels();
  });
  $("model").addEventListener("change", () => {
    localStorage.setItem(MODEL_STORAGE, $("model").value);
    updateSnippet();
  });
  $("language").addEventListener("click", () => {
    const next = state.language === "zh" ? "en" : "zh";
    saveLanguage(next);
    setLanguage(next);
  });
  $("new-chat").addEventListener("click", newChat);
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("prompt").addEventListener("keydown", (event) => {
    // isComposing: Enter also confirms a Chinese input method's candidate; that must not send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  for (const id of ["prompt", "max-tokens", "temperature", "system"]) $(id).addEventListener("input", updateSnippet);
  $("file").addEventListener("change", () => {
    addFiles(Array.from($("file").files));
    $("file").value = "";
  });
  $("tab-python").addEventListener("click", () => selectTab("python"));
  $("tab-curl").addEventListener("click", () => selectTab("curl"));
  $("copy").addEventListener("click", copySnippet);
  wireDragAndDrop();
  loadModels();
  document.body.dataset.ready = "true";
}

start();

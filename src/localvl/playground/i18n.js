// Every string the page shows, in both languages. Most of localvl's users read Chinese, so the
// page follows the browser's language and remembers a manual choice.

export const STRINGS = {
  en: {
    title: "playground",
    model: "Model",
    apiKey: "API key",
    apiKeyPlaceholder: "x-api-key (kept in this browser)",
    newChat: "New chat",
    options: "Options",
    maxTokens: "Max tokens",
    temperature: "Temperature",
    serverDefault: "default",
    system: "System prompt",
    systemPlaceholder: "Optional instructions for the model",
    promptPlaceholder: "Ask about an image or a PDF… (Enter sends, Shift+Enter for a new line)",
    attach: "Attach",
    dropHint: "or paste / drop an image or PDF",
    dropHere: "Drop images or PDFs here",
    send: "Send",
    stop: "Stop",
    you: "You",
    assistant: "Assistant",
    thinking: "Thinking",
    remove: "Remove",
    code: "Code for this request",
    copy: "Copy",
    copied: "Copied",
    empty: "Ask a question, attach an image or a PDF, and watch the answer stream in.",
    needKey: "This server needs an API key: enter it in the API key field above.",
    badKey: "The server refused this API key: check the API key field above.",
    noModels: "The server lists no models.",
    unsupportedFile: "Only images (PNG, JPEG, GIF, WebP) and PDF documents can be attached.",
    readFailed: "Could not read the file.",
    networkError: "Cannot reach the server.",
    requestFailed: "The request failed",
    stopped: "stopped",
    ttft: "TTFT",
    tokensPerSecond: "tok/s",
    tokens: "output tokens",
    stopReason: "stop",
    exampleQuestion: "What is in this image?",
    language: "中文",
    languageLabel: "切换到中文",
  },
  zh: {
    title: "试用页",
    model: "模型",
    apiKey: "API 密钥",
    apiKeyPlaceholder: "x-api-key（保存在本浏览器中）",
    newChat: "新对话",
    options: "选项",
    maxTokens: "最大输出 token 数",
    temperature: "温度",
    serverDefault: "默认",
    system: "系统提示词",
    systemPlaceholder: "可选：给模型的指示",
    promptPlaceholder: "就图片或 PDF 提问……（Enter 发送，Shift+Enter 换行）",
    attach: "添加附件",
    dropHint: "或粘贴 / 拖入图片或 PDF",
    dropHere: "把图片或 PDF 拖到这里",
    send: "发送",
    stop: "停止",
    you: "你",
    assistant: "助手",
    thinking: "思考过程",
    remove: "移除",
    code: "本次请求的代码",
    copy: "复制",
    copied: "已复制",
    empty: "输入问题，附上图片或 PDF，即可看到回答逐字出现。",
    needKey: "此服务器需要 API 密钥：请在上方的 API 密钥栏中输入。",
    badKey: "服务器拒绝了这个 API 密钥：请检查上方的 API 密钥栏。",
    noModels: "服务器没有列出任何模型。",
    unsupportedFile: "只能添加图片（PNG、JPEG、GIF、WebP）和 PDF 文档。",
    readFailed: "无法读取该文件。",
    networkError: "无法连接到服务器。",
    requestFailed: "请求失败",
    stopped: "已停止",
    ttft: "首 token 延迟",
    tokensPerSecond: "token/秒",
    tokens: "输出 token",
    stopReason: "结束原因",
    exampleQuestion: "这张图片里有什么？",
    language: "English",
    languageLabel: "Switch to English",
  },
};

const STORAGE_KEY = "localvl.language";

export function initialLanguage() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (saved && saved in STRINGS) return saved;
  return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
}

export function saveLanguage(language) {
  localStorage.setItem(STORAGE_KEY, language);
}

export function translator(language) {
  const table = STRINGS[language] || STRINGS.en;
  return (key) => table[key] ?? STRINGS.en[key] ?? key;
}

const ATTRIBUTES = { i18nPlaceholder: "placeholder", i18nTitle: "title", i18nAriaLabel: "aria-label" };

// Static markup names its strings with data-i18n (text), data-i18n-placeholder, data-i18n-title
// and data-i18n-aria-label, so switching language is one pass over the document.
export function applyLanguage(root, language) {
  const t = translator(language);
  document.documentElement.lang = language === "zh" ? "zh-CN" : "en";
  for (const element of root.querySelectorAll("[data-i18n]")) element.textContent = t(element.dataset.i18n);
  for (const [key, attribute] of Object.entries(ATTRIBUTES)) {
    const selector = "[data-" + key.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase()) + "]";
    for (const element of root.querySelectorAll(selector)) element.setAttribute(attribute, t(element.dataset[key]));
  }
  return t;
}

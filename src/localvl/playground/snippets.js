// A conversation as the page keeps it, as the API body, and as the Python / curl a user would
// write for the same request. Attached files stay files in the snippets: a placeholder naming the
// file rather than megabytes of base64.

// turns: [{role: "user" | "assistant", parts: [{kind: "text", text} |
//          {kind: "file", name, mediaType, data}]}]
export function apiMessages(turns, fileData = (part) => part.data) {
  return turns.map((turn) => {
    const files = turn.parts.filter((part) => part.kind === "file");
    const text = turn.parts.filter((part) => part.kind === "text").map((part) => part.text).join("\n");
    if (!files.length) return { role: turn.role, content: text };
    const content = files.map((part) => ({
      type: part.mediaType === "application/pdf" ? "document" : "image",
      source: { type: "base64", media_type: part.mediaType, data: fileData(part) },
    }));
    if (text) content.push({ type: "text", text });
    return { role: turn.role, content };
  });
}

export function requestBody({ model, maxTokens, temperature, system, turns }, fileData) {
  const body = { model, max_tokens: maxTokens };
  if (temperature !== null && temperature !== undefined) body.temperature = temperature;
  if (system) body.system = system;
  body.messages = apiMessages(turns, fileData);
  return body;
}

// Stands for a file's base64 in a snippet: Python reads the file, curl shows a placeholder.
class FileData {
  constructor(name) {
    this.name = name;
  }
}

function pythonString(text) {
  // JSON's string escapes are all valid in Python string literals.
  return JSON.stringify(text);
}

function python(value, indent) {
  if (value instanceof FileData) return `b64(${pythonString(value.name)})`;
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return pythonString(value);
  const inner = indent + "    ";
  const isList = Array.isArray(value);
  const items = isList
    ? value.map((item) => python(item, inner))
    : Object.entries(value).map(([key, item]) => `${pythonString(key)}: ${python(item, inner)}`);
  const [open, close] = isList ? ["[", "]"] : ["{", "}"];
  const flat = open + items.join(", ") + close;
  if (!items.length || (flat.length + indent.length <= 88 && !flat.includes("\n"))) return flat;
  return `${open}\n${items.map((item) => inner + item + ",").join("\n")}\n${indent}${close}`;
}

export function pythonSnippet(baseUrl, request) {
  const body = requestBody(request, (part) => new FileData(part.name));
  const hasFiles = request.turns.some((turn) => turn.parts.some((part) => part.kind === "file"));
  const lines = [];
  if (hasFiles) lines.push("import base64", "");
  lines.push("import anthropic", "");
  lines.push(`client = anthropic.Anthropic(base_url=${pythonString(baseUrl)}, api_key="YOUR_API_KEY")`, "");
  if (hasFiles) {
    lines.push("", "def b64(path):", '    with open(path, "rb") as f:', "        return base64.b64encode(f.read()).decode()", "", "");
  }
  lines.push("with client.messages.stream(");
  for (const [key, value] of Object.entries(body)) lines.push(`    ${key}=${python(value, "    ")},`);
  lines.push(") as stream:", "    for text in stream.text_stream:", '        print(text, end="", flush=True)');
  return lines.join("\n") + "\n";
}

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

export function curlSnippet(baseUrl, request) {
  const names = [];
  const body = requestBody(request, (part) => {
    names.push(part.name);
    return `<base64 of ${part.name}>`;
  });
  const lines = [];
  if (names.length) lines.push(`# replace each "<base64 of FILE>" with the output of: base64 -w0 FILE`);
  lines.push(
    `curl -N ${baseUrl}/v1/messages \\`,
    "  -H 'content-type: application/json' \\",
    "  -H 'x-api-key: YOUR_API_KEY' \\",
    "  -H 'anthropic-version: 2023-06-01' \\",
    `  -d ${shellQuote(JSON.stringify({ ...body, stream: true }, null, 2))}`,
  );
  return lines.join("\n") + "\n";
}

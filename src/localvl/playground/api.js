// The page talks to the server only through its public API, with the same headers as any client.

export const ANTHROPIC_VERSION = "2023-06-01";

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status; // 0 for an error event inside a stream, or when the server is unreachable
    this.type = type;
  }
}

export function apiHeaders(apiKey) {
  const headers = { "anthropic-version": ANTHROPIC_VERSION };
  if (apiKey) headers["x-api-key"] = apiKey;
  return headers;
}

async function errorFrom(response) {
  let type = "api_error";
  let message = `HTTP ${response.status}`;
  try {
    const payload = await response.json();
    if (payload && payload.error) {
      type = payload.error.type || type;
      message = payload.error.message || message;
    }
  } catch {
    // not the JSON envelope (a proxy's page, say): the status says enough
  }
  return new ApiError(response.status, type, message);
}

async function send(url, options) {
  try {
    return await fetch(url, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network_error", error.message);
  }
}

export async function listModels(apiKey) {
  const response = await send("/v1/models?limit=1000", { headers: apiHeaders(apiKey) });
  if (!response.ok) throw await errorFrom(response);
  const payload = await response.json();
  return payload.data.map((model) => model.id);
}

// One SSE stream, frame by frame: {event, data} with data parsed from JSON. Frames are split on
// blank lines; a "\r" at a chunk's end is kept back until the next chunk says whether "\n" follows.
export async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    const cut = done || !buffer.endsWith("\r") ? buffer.length : buffer.length - 1;
    let text = buffer.slice(0, cut).replace(/\r\n?/g, "\n");
    buffer = buffer.slice(cut);
    let end;
    while ((end = text.indexOf("\n\n")) >= 0) {
      const frame = parseFrame(text.slice(0, end));
      text = text.slice(end + 2);
      if (frame) yield frame;
    }
    buffer = text + buffer;
    if (done) {
      const frame = parseFrame(buffer);
      if (frame) yield frame;
      return;
    }
  }
}

function parseFrame(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { event, data: JSON.parse(data.join("\n")) };
}

// POST /v1/messages with stream: true. Calls onText / onThinking per delta; resolves with the
// timings once the message stops: TTFT is from sending the request to the first delta, and the
// rate counts the tokens after the first over the time after it (the decode speed).
export async function streamMessage(apiKey, body, { onText, onThinking, signal }) {
  const started = performance.now();
  const response = await send("/v1/messages", {
    method: "POST",
    headers: { ...apiHeaders(apiKey), "content-type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  let firstDelta = null;
  let outputTokens = 0;
  let stopReason = null;
  let stopped = false;
  for await (const { event, data } of sseEvents(response.body)) {
    if (event === "message_start") {
      outputTokens = data.message?.usage?.output_tokens ?? 0;
    } else if (event === "content_block_delta") {
      const delta = data.delta || {};
      if (delta.type === "text_delta" || delta.type === "thinking_delta") firstDelta ??= performance.now();
      if (delta.type === "text_delta") onText(delta.text);
      else if (delta.type === "thinking_delta") onThinking(delta.thinking);
    } else if (event === "message_delta") {
      outputTokens = data.usage?.output_tokens ?? outputTokens;
      stopReason = data.delta?.stop_reason ?? stopReason;
    } else if (event === "message_stop") {
      stopped = true;
    } else if (event === "error") {
      throw new ApiError(0, data.error?.type || "api_error", data.error?.message || "error");
    }
  }
  if (!stopped) throw new ApiError(0, "api_error", "the stream ended before message_stop");
  const finished = performance.now();
  const ttftMs = firstDelta === null ? null : firstDelta - started;
  const decodeSeconds = firstDelta === null ? 0 : (finished - firstDelta) / 1000;
  const tokensPerSecond = outputTokens > 1 && decodeSeconds > 0 ? (outputTokens - 1) / decodeSeconds : null;
  return { ttftMs, outputTokens, tokensPerSecond, stopReason };
}

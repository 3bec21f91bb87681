// The one module that talks to the node. Inside the desktop app, requests go
// through Tauri commands (`invoke`), in-process; in a browser, through the REST
// API with the API key. Streams (chat), uploads (QR pictures) and the live
// WebSocket use HTTP in both cases, to the node's localhost API.

const tauri = globalThis.__TAURI__;
export const inApp = Boolean(tauri && tauri.core);

const KEY_STORE = "swarmllm.api_key";
let base = "";
let apiKey = "";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code || "HTTP_" + status;
    this.body = body;
  }
}

/** Finds the node: the app asks the shell; a browser uses its own origin and a
 *  key from `#key=…` (kept in localStorage, removed from the address bar). */
export async function init() {
  if (inApp) {
    const info = await tauri.core.invoke("app_info");
    base = info.api_base;
    apiKey = info.api_key;
    return info;
  }
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    localStorage.setItem(KEY_STORE, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + "#/dashboard");
  }
  apiKey = localStorage.getItem(KEY_STORE) || "";
  return { api_base: location.origin, in_app: false };
}

export function hasKey() {
  return Boolean(apiKey);
}

export function setKey(key) {
  apiKey = key.trim();
  if (!inApp) localStorage.setItem(KEY_STORE, apiKey);
}

export function key() {
  return apiKey;
}

function headers(json) {
  const h = {};
  if (apiKey) h.Authorization = "Bearer " + apiKey;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

/** A JSON request: resolves to the body, throws ApiError on 4xx/5xx. */
export async function api(method, path, body) {
  if (inApp) {
    const r = await tauri.core.invoke("node_request", { method, path, body: body ?? null });
    if (r.status >= 400) throw new ApiError(r.status, r.body);
    return r.body;
  }
  const r = await fetch(base + path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

export const get = (path) => api("GET", path);
export const post = (path, body = {}) => api("POST", path, body);
export const put = (path, body) => api("PUT", path, body);
export const del = (path, body) => api("DELETE", path, body);

/** POSTs `body` with `stream: true` and calls `onEvent` with each SSE data JSON. */
export async function stream(path, body, onEvent, signal) {
  const r = await fetch(base + path, {
    method: "POST",
    headers: headers(true),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of chunk.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        try {
          onEvent(JSON.parse(data));
        } catch {
          /* a keep-alive or comment */
        }
      }
    }
  }
}

/** POSTs a picture (Blob) as the raw body. */
export async function upload(path, blob) {
  const r = await fetch(base + path, {
    method: "POST",
    headers: { ...headers(false), "Content-Type": blob.type || "application/octet-stream" },
    body: blob,
  });
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

/** The live updates socket (`stats_update`, `peer_list`). */
export function socket(onMessage) {
  const url = (base || location.origin).replace(/^http/, "ws") + "/api/admin/ws";
  const ws = new WebSocket(url);
  ws.onmessage = (e) => {
    try {
      onMessage(JSON.parse(e.data));
    } catch {
      /* ignore */
    }
  };
  return ws;
}

/** Desktop-only extras (undefined in a browser). */
export const app = inApp
  ? {
      setPrivateMode: (enabled) => tauri.core.invoke("set_private_mode", { enabled }),
      onPrivateMode: (f) => tauri.event.listen("private-mode", (e) => f(e.payload)),
      restart: () => tauri.core.invoke("restart_app"),
    }
  : undefined;

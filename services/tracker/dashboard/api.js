// The tracker's /api, with the caller's bearer token on every request.
//
// `ftpipe dashboard` opens `http://host:port/#token=...`: a fragment never reaches a server or a
// Referer header. The page keeps the token in sessionStorage (this tab only, gone when it closes)
// and removes it from the address bar, so it is not left in the history or a copied link.

const TOKEN_KEY = "ftpipe.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Move a `#token=...` fragment into sessionStorage (true if there was one); the address bar
 * shows the runs page instead. */
export function adoptTokenFromUrl() {
  const match = /^#token=([^&]*)/.exec(location.hash);
  if (!match) return false;
  setToken(decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search + "#/runs");
  return true;
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token.trim());
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** `unauthorized(reason)` is called on every 401 (the app shows the token prompt). */
let onUnauthorized = () => {};
export function whenUnauthorized(handler) {
  onUnauthorized = handler;
}

/**
 * Call `/api/<path>`. `json` sends a JSON body, `form` a FormData (multipart). Answers the parsed
 * JSON; throws ApiError with the server's own message ({"error": ...}) when the status is not 2xx.
 */
export async function api(path, { method = "GET", json, form } = {}) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  }
  let resp;
  try {
    resp = await fetch(`api/${path}`, { method, headers, body });
  } catch (err) {
    throw new ApiError(0, `the tracker did not answer (${err.message}); is the stack running?`);
  }
  const data = await resp.json().catch(() => null);
  if (resp.ok) return data;
  const message = (data && data.error) || `${resp.status} ${resp.statusText}`;
  if (resp.status === 401) onUnauthorized(message);
  throw new ApiError(resp.status, message);
}

/** A query string from an object, leaving out empty values. */
export function qs(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

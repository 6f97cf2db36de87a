// The page's one way to the server. When the page was opened as /?token=…, every API URL (audio sources
// included) carries that token, as `clap serve` asks of every request off loopback.

const token = new URLSearchParams(location.search).get("token");

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

/** The absolute URL of an API path ("api/search"), with its query parameters and the page's token. */
export function apiUrl(path, params = {}) {
  const url = new URL(path, document.baseURI);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) url.searchParams.set(key, value);
  }
  if (token) url.searchParams.set("token", token);
  return url.href;
}

export const audioUrl = (id) => apiUrl(`api/audio/${id}`);

export async function getJson(path, params = {}, { signal } = {}) {
  const response = await fetch(apiUrl(path, params), { signal, headers: { Accept: "application/json" } });
  return readJson(response);
}

export async function postFile(path, file, { signal } = {}) {
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch(apiUrl(path), { method: "POST", body: form, signal });
  return readJson(response);
}

async function readJson(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's error page): the status line says what happened
  }
  if (!response.ok) {
    throw new ApiError(body?.error ?? `${response.status} ${response.statusText}`.trim(), response.status);
  }
  return body;
}

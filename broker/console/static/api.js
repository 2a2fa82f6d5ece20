// The broker's JSON API, called with the pasted bearer token. The token lives in this tab's
// sessionStorage only: never a cookie (so there is nothing for CSRF to use) and never a URL.

import { isUuid } from "./dom.js";

const TOKEN_KEY = "credential-broker.console.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function keepToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// What the token says about itself, for the header only. Unverified: the API verifies it on
// every call, and the console grants nothing on the strength of these claims.
export function claims(raw) {
  try {
    const part = raw.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const payload = JSON.parse(new TextDecoder().decode(bytes));
    return payload && typeof payload === "object" ? payload : {};
  } catch {
    return {};
  }
}

export class ApiError extends Error {
  constructor(status, problem) {
    const body = problem && typeof problem === "object" ? problem : {};
    super(body.detail || body.title || `the broker answered ${status}`);
    this.status = status;
    this.code = body.code || null;
    this.title = body.title || null;
  }
}

// Called once when the broker refuses the token (401), so the page can ask for a new one.
let onRefused = () => {};
export function whenRefused(handler) {
  onRefused = handler;
}

const apiRoot = () => document.getElementById("content").dataset.apiRoot;

// "/leases/<id>": ids go into a path only when they are UUIDs, and always encoded.
export function path(collection, id, suffix = "") {
  if (!isUuid(id)) throw new Error(`not a UUID: ${collection} id`);
  return `/${collection}/${encodeURIComponent(id)}${suffix}`;
}

export async function api(method, route, { query = {}, body } = {}) {
  const current = token();
  if (!current) {
    onRefused("Sign in first.");
    throw new ApiError(401, { detail: "not signed in" });
  }
  const url = new URL(apiRoot() + route, window.location.origin);
  for (const [key, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, value);
  }
  const headers = { Authorization: `Bearer ${current}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
      referrerPolicy: "no-referrer",
    });
  } catch {
    throw new ApiError(0, { detail: "the broker could not be reached" });
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.status === 401) {
    const error = new ApiError(401, data);
    onRefused(`The broker refused the token: ${error.message}.`);
    throw error;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Every page of a paged list (up to `cap` items): {items, truncated}.
export async function allPages(route, query = {}, cap = 2000) {
  const items = [];
  let cursor = null;
  do {
    const page = await api("GET", route, { query: { ...query, limit: 500, cursor } });
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < cap);
  return { items, truncated: Boolean(cursor) };
}

export function describe(error) {
  if (error instanceof ApiError) {
    const code = error.code ? ` (${error.code})` : "";
    return `${error.message}${code}`;
  }
  return String(error && error.message ? error.message : error);
}

// Building the page. Every string given here becomes a text node or an attribute value set
// with setAttribute: nothing in the console ever parses markup from data (no HTML sinks),
// so a workload's purpose or context shows as the characters it is, whatever they are.

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export function isUuid(value) {
  return typeof value === "string" && UUID.test(value);
}

const root = () => document.getElementById("content").dataset.consoleRoot;

// A console path for one object, or null when `id` is not a UUID (then no link is made).
export function consoleHref(kind, id) {
  if (!isUuid(id)) return null;
  return `${root()}${kind}/${encodeURIComponent(id)}`;
}

// A console path for a view, with an optional query (values are encoded).
export function viewHref(view, query = {}) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") params.set(key, value);
  }
  const search = params.toString();
  return `${root()}${view}${search ? `?${search}` : ""}`;
}

// el("td", {class: "x"}, "text", otherNode): strings become text nodes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (/^on/i.test(name) || name === "href" || name === "src" || name === "style") {
      throw new Error(`el(): set ${name} with link() or addEventListener, not as an attribute`);
    }
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// A link to a console page; `href` must come from consoleHref or viewHref. Null href: plain text.
export function link(href, ...children) {
  if (href === null) return el("span", {}, ...children);
  if (typeof href !== "string" || !href.startsWith(root())) {
    throw new Error("link(): only console paths");
  }
  const anchor = el("a", {}, ...children);
  anchor.setAttribute("href", href);
  return anchor;
}

export function button(label, handler, attrs = {}) {
  const node = el("button", { type: "button", ...attrs }, label);
  node.addEventListener("click", handler);
  return node;
}

export function byId(id) {
  return document.getElementById(id);
}

export function setText(id, value) {
  byId(id).textContent = value;
}

export function show(node, visible = true) {
  (typeof node === "string" ? byId(node) : node).hidden = !visible;
}

// "—" for missing values, so an empty cell is never mistaken for an empty string.
export function orDash(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

export function mono(value) {
  return el("span", { class: "mono" }, orDash(value));
}

// A <time> showing an RFC 3339 UTC time as "2026-11-28 14:29:21 UTC".
export function time(iso) {
  if (!iso) return "—";
  const shown = String(iso).replace("T", " ").replace(/(\.\d+)?Z$/, " UTC");
  return el("time", { datetime: iso }, shown);
}

export function duration(ms) {
  if (ms <= 0) return "expired";
  const total = Math.floor(ms / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h > 0) return `${h}h ${m}m`;
  if (m > 0) return `${m}m ${s}s`;
  return `${s}s`;
}

// A span that the once-a-second ticker keeps counting down to `iso`.
export function timeLeft(iso) {
  if (!iso) return "—";
  const node = el("span", { class: "time-left", "data-expires": iso });
  updateTimeLeft(node);
  return node;
}

function updateTimeLeft(node) {
  const left = Date.parse(node.dataset.expires) - Date.now();
  node.textContent = duration(left);
  node.classList.toggle("soon", left > 0 && left < 60_000);
  node.classList.toggle("gone", left <= 0);
}

export function tickTimeLeft() {
  for (const node of document.querySelectorAll(".time-left")) updateTimeLeft(node);
}

// A value of a workload's `context`: strings as they are, anything else as indented JSON.
export function jsonValue(value) {
  if (typeof value === "string") return el("span", { class: "value" }, value);
  return el("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

// columns: [{label, cell(row) -> string | Node, class?}]
export function table(caption, columns, rows) {
  const head = el("tr", {}, columns.map((c) => el("th", { scope: "col", class: c.class }, c.label)));
  const body = rows.map((row) => el("tr", {}, columns.map((c) => el("td", { class: c.class }, c.cell(row)))));
  return el("table", {}, el("caption", { class: "visually-hidden" }, caption), el("thead", {}, head), el("tbody", {}, body));
}

// entries: [[label, string | Node], ...] into a <dl>.
export function fillPairs(dl, entries) {
  const node = typeof dl === "string" ? byId(dl) : dl;
  node.replaceChildren(...entries.flatMap(([label, value]) => [el("dt", {}, label), el("dd", {}, value)]));
  return node;
}

export function contextTable(caption, context) {
  const entries = Object.entries(context || {});
  if (entries.length === 0) return el("p", { class: "muted" }, "No context was given.");
  return table(
    caption,
    [
      { label: "Key", cell: ([key]) => el("span", { class: "mono" }, key), class: "key" },
      { label: "Value", cell: ([, value]) => jsonValue(value) },
    ],
    entries,
  );
}

export function stateBadge(state) {
  return el("span", { class: `badge state-${String(state).replace(/[^a-z_]/g, "")}` }, orDash(state));
}

// Operator views: the active leases, one lease, one task, the kill switch and the audit log.

import { allPages, api, ApiError, describe, path } from "./api.js";
import { confirmAction, dialogOpen } from "./dialog.js";
import {
  byId,
  consoleHref,
  contextTable,
  el,
  fillPairs,
  isUuid,
  link,
  mono,
  orDash,
  show,
  stateBadge,
  table,
  time,
  timeLeft,
  viewHref,
} from "./dom.js";

const REFRESH_MS = 5_000;

function say(message, kind = "ok") {
  const node = byId("status");
  node.textContent = message;
  node.className = `status ${kind}`;
  node.hidden = !message;
}

function shortId(id) {
  return isUuid(id) ? id.slice(0, 8) : orDash(id);
}

function taskLink(lease) {
  return link(consoleHref("tasks", lease.task_id), mono(lease.task), " ", el("span", { class: "muted" }, shortId(lease.task_id)));
}

// Revoke one lease after the confirmation step; resolves to the lease, or null if cancelled.
function revokeLease(lease) {
  return confirmAction({
    title: "Revoke this lease?",
    summary:
      "Vault revokes the credential now. When it is the task's last active lease, the task ends as revoked.",
    details: [
      ["Credential", `${lease.name} (${lease.kind})`],
      ["Task", `${lease.task} ${lease.task_id}`],
      ["Owner", orDash(lease.owner)],
      ["Workload", mono(lease.workload)],
      ["Purpose", orDash(lease.purpose)],
    ],
    okLabel: "Revoke lease",
    action: (reason) => api("POST", path("leases", lease.id, "/revoke"), { body: { reason } }),
  });
}

function revokeButton(lease, after) {
  const node = el("button", { type: "button", class: "danger small" }, "Revoke…");
  node.setAttribute("aria-label", `Revoke lease ${lease.name} of task ${lease.task} ${shortId(lease.task_id)}`);
  node.addEventListener("click", async () => {
    const result = await revokeLease(lease);
    if (result) {
      say(`Lease ${result.name} of task ${result.task_id} is ${result.state}.`);
      await after(result);
    }
  });
  return node;
}

// ---- active leases ------------------------------------------------------------------------

const OTHER = { owner: "workload", workload: "owner" };
const LABEL = { owner: "Owner", workload: "Workload" };

function groupTable(key, value, leases, after) {
  const other = OTHER[key];
  const columns = [
    { label: "Credential", cell: (l) => el("span", {}, link(consoleHref("leases", l.id), l.name), " ", el("span", { class: "muted" }, l.kind)) },
    { label: "Task", cell: taskLink },
    { label: LABEL[other], cell: (l) => (other === "workload" ? mono(l.workload) : orDash(l.owner)) },
    { label: "Purpose", cell: (l) => el("span", { class: "purpose" }, orDash(l.purpose)) },
    { label: "Time left", cell: (l) => timeLeft(l.expires_at), class: "num" },
    { label: "Expires", cell: (l) => time(l.expires_at) },
    { label: "Actions", cell: (l) => revokeButton(l, after) },
  ];
  const kill = link(viewHref("kill-switch", { [key]: value }), `Kill switch for this ${key}…`);
  const count = `${leases.length} active lease${leases.length === 1 ? "" : "s"}`;
  return el(
    "section",
    { class: "group", "aria-label": `${LABEL[key]} ${value}` },
    el("div", { class: "group-head" }, el("h2", {}, `${LABEL[key]}: `, key === "workload" ? mono(value) : value), el("span", { class: "muted" }, count), kill),
    table(`Active leases of ${key} ${value}`, columns, leases),
  );
}

export async function leasesView() {
  const auto = byId("auto-refresh");
  const groups = byId("lease-groups");
  let data = null;
  let busy = false;
  let last = "";

  const groupBy = () => document.querySelector('input[name="group-by"]:checked').value;

  const render = () => {
    const key = groupBy();
    const grouped = new Map();
    for (const lease of [...data.active].sort((a, b) => a.expires_at.localeCompare(b.expires_at))) {
      const value = lease[key];
      if (!grouped.has(value)) grouped.set(value, []);
      grouped.get(value).push(lease);
    }
    const names = [...grouped.keys()].sort();
    groups.replaceChildren(...names.map((name) => groupTable(key, name, grouped.get(name), () => load(true))));
    show("lease-empty", data.active.length === 0);
    const owners = new Set(data.active.map((l) => l.owner)).size;
    const workloads = new Set(data.active.map((l) => l.workload)).size;
    byId("lease-summary").textContent =
      `${data.active.length} active leases, ${owners} owners, ${workloads} workloads` +
      (data.truncated ? " (only the newest 2000 are shown)" : "");
    byId("pending-table").replaceChildren(
      table(
        "Leases waiting for Vault to confirm revocation",
        [
          { label: "Credential", cell: (l) => link(consoleHref("leases", l.id), l.name) },
          { label: "Task", cell: taskLink },
          { label: "Owner", cell: (l) => orDash(l.owner) },
          { label: "Attempts", cell: (l) => String(l.revoke_attempts), class: "num" },
          { label: "Last error", cell: (l) => orDash(l.last_error) },
          { label: "Next attempt", cell: (l) => time(l.next_attempt_at) },
        ],
        data.pending,
      ),
    );
    show("pending-section", data.pending.length > 0);
  };

  const load = async (force = false) => {
    if (busy) return;
    busy = true;
    try {
      const [active, pending] = await Promise.all([
        allPages("/leases", { state: "active" }),
        allPages("/leases", { state: "revoke_pending" }),
      ]);
      data = { active: active.items, pending: pending.items, truncated: active.truncated };
      const signature = JSON.stringify([
        data.active.map((l) => [l.id, l.expires_at]),
        data.pending.map((l) => [l.id, l.revoke_attempts]),
      ]);
      // Re-draw only on change, so the refresh does not steal focus from a button.
      if (force || signature !== last) render();
      last = signature;
      byId("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } finally {
      busy = false;
    }
  };

  for (const radio of document.querySelectorAll('input[name="group-by"]')) {
    radio.addEventListener("change", () => data && render());
  }
  byId("refresh-now").addEventListener("click", () => load(true).catch((e) => say(describe(e), "error")));
  setInterval(() => {
    if (auto.checked && !dialogOpen() && document.visibilityState === "visible") {
      load().catch((e) => say(`Refresh failed: ${describe(e)}`, "error"));
    }
  }, REFRESH_MS);
  await load(true);
}

// ---- one lease ----------------------------------------------------------------------------

export async function leaseView(_roles, leaseId) {
  byId("lease-title").textContent = leaseId;
  const render = (lease) => {
    fillPairs("lease-fields", [
      ["State", stateBadge(lease.state)],
      ["Credential", `${lease.name} (${lease.kind})`],
      ["Task", taskLink(lease)],
      ["Owner", orDash(lease.owner)],
      ["Workload", mono(lease.workload)],
      ["Purpose", el("span", { class: "purpose" }, orDash(lease.purpose))],
      ["Issued", time(lease.issued_at)],
      ["Expires", el("span", {}, time(lease.expires_at), lease.state === "active" ? [" (", timeLeft(lease.expires_at), " left)"] : [])],
      ["Revoked", time(lease.revoked_at)],
      ["Revoke reason", orDash(lease.revoke_reason)],
      ["Revoke attempts", String(lease.revoke_attempts)],
      ["Last Vault error", orDash(lease.last_error)],
      ["Next attempt", time(lease.next_attempt_at)],
      ["Vault lease id", mono(lease.vault_lease_id)],
    ]);
    show("lease-revoke", lease.state === "active");
  };
  let lease;
  try {
    lease = await api("GET", path("leases", leaseId));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      say("There is no such lease.", "error");
      return;
    }
    throw error;
  }
  render(lease);
  byId("lease-revoke").addEventListener("click", async () => {
    const result = await revokeLease(lease);
    if (result) {
      lease = result;
      say(`Lease ${result.name} is ${result.state}.`);
      render(result);
    }
  });
}

// ---- one task -----------------------------------------------------------------------------

export async function taskView(_roles, taskId) {
  byId("task-title").textContent = taskId;
  const load = async () => {
    const [task, audit] = await Promise.all([
      api("GET", path("task", taskId)),
      api("GET", "/audit", { query: { task_id: taskId, limit: 200 } }),
    ]);
    render(task, audit.items);
  };
  const render = (task, events) => {
    fillPairs("task-fields", [
      ["State", stateBadge(task.state)],
      ["Task type", mono(task.task)],
      ["Owner", el("span", {}, orDash(task.owner), " ", link(viewHref("kill-switch", { owner: task.owner }), "kill switch…"))],
      ["Workload", el("span", {}, mono(task.workload), " ", link(viewHref("kill-switch", { workload: task.workload }), "kill switch…"))],
      ["Purpose", el("span", { class: "purpose" }, orDash(task.purpose))],
      ["Time to live", `${task.ttl_seconds} seconds`],
      ["Created", time(task.created_at)],
      ["Expires", el("span", {}, time(task.expires_at), task.state === "active" ? [" (", timeLeft(task.expires_at), " left)"] : [])],
      ["Finished", time(task.finished_at)],
      ["Outcome", orDash(task.outcome)],
      ["End reason", orDash(task.end_reason)],
    ]);
    byId("task-context").replaceChildren(contextTable("Context of this task", task.context));
    if (task.approval) {
      fillPairs("task-approval", [
        ["State", stateBadge(task.approval.state)],
        ["Decide before", time(task.approval.expires_at)],
        ["Approved", time(task.approval.approved_at)],
        ["Claimed", time(task.approval.claimed_at)],
      ]);
      const decisions = task.approval.decisions;
      byId("task-decisions").replaceChildren(
        decisions.length === 0
          ? el("p", { class: "muted" }, "No decisions yet.")
          : table(
              "Approval decisions",
              [
                { label: "Approver", cell: (d) => orDash(d.approver) },
                { label: "Decision", cell: (d) => stateBadge(d.decision) },
                { label: "Reason", cell: (d) => orDash(d.reason) },
                { label: "At", cell: (d) => time(d.at) },
              ],
              decisions,
            ),
      );
      show("task-approval-section");
    }
    byId("task-leases").replaceChildren(
      task.leases.length === 0
        ? el("p", { class: "muted" }, "No leases: nothing was issued.")
        : table(
            "Leases of this task",
            [
              { label: "Credential", cell: (l) => link(consoleHref("leases", l.id), l.name) },
              { label: "Kind", cell: (l) => l.kind },
              { label: "State", cell: (l) => stateBadge(l.state) },
              { label: "Time left", cell: (l) => (l.state === "active" ? timeLeft(l.expires_at) : "—"), class: "num" },
              { label: "Revoked", cell: (l) => time(l.revoked_at) },
              { label: "Revoke reason", cell: (l) => orDash(l.revoke_reason) },
              { label: "Actions", cell: (l) => (l.state === "active" ? revokeButton(l, load) : "") },
            ],
            task.leases,
          ),
    );
    byId("task-audit").replaceChildren(auditTable(events));
  };
  try {
    await load();
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      say("There is no such task.", "error");
      return;
    }
    throw error;
  }
}

// ---- kill switch --------------------------------------------------------------------------

const FILTERS = ["workload", "owner", "task"];

export async function killSwitchView() {
  const form = byId("kill-form");
  const error = byId("kill-error");
  const given = new URLSearchParams(window.location.search);
  for (const name of FILTERS) byId(`kill-${name}`).value = given.get(name) || "";

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    show(error, false);
    const filters = {};
    for (const name of FILTERS) {
      const value = byId(`kill-${name}`).value.trim();
      if (value) filters[name] = value;
    }
    if (Object.keys(filters).length === 0) {
      error.textContent = "Fill in at least one of workload, owner or task type.";
      show(error);
      return;
    }
    let preview;
    try {
      preview = await matching(filters);
    } catch (failure) {
      error.textContent = `Could not count what matches: ${describe(failure)}`;
      show(error);
      return;
    }
    const result = await confirmAction({
      title: "Run the kill switch?",
      summary: `This ends ${preview.tasks} open task${preview.tasks === 1 ? "" : "s"} matching now and revokes ${preview.leases} active lease${preview.leases === 1 ? "" : "s"}. It cannot be undone.`,
      details: [
        ...FILTERS.filter((name) => filters[name]).map((name) => [name === "task" ? "Task type" : name[0].toUpperCase() + name.slice(1), mono(filters[name])]),
        ["Open tasks now", `${preview.active} active, ${preview.pending} waiting for approval, ${preview.issuing} issuing`],
      ],
      okLabel: "End these tasks",
      action: (reason) => api("POST", "/leases/revoke", { body: { ...filters, reason } }),
    });
    if (result) showResult(result);
  });
}

// What the kill switch would hit right now, from the same filters on the read API.
async function matching(filters) {
  const count = async (route, state) => (await allPages(route, { ...filters, state }, 10_000)).items.length;
  const [active, pending, issuing, leases] = await Promise.all([
    count("/tasks", "active"),
    count("/tasks", "pending_approval"),
    count("/tasks", "issuing"),
    count("/leases", "active"),
  ]);
  return { active, pending, issuing, leases, tasks: active + pending + issuing };
}

function showResult(result) {
  fillPairs("kill-result-fields", [
    ["Tasks ended", String(result.tasks.length)],
    ["Leases the scheduler is revoking", String(result.revocation.pending_leases)],
  ]);
  byId("kill-result-tasks").replaceChildren(
    el("ul", {}, result.tasks.map((id) => el("li", {}, link(consoleHref("tasks", id), mono(id))))),
  );
  show("kill-result");
  say(`Kill switch ran: ${result.tasks.length} tasks ended; the scheduler is revoking their ${result.revocation.pending_leases} leases.`);
}

// ---- audit --------------------------------------------------------------------------------

function auditTable(events) {
  if (events.length === 0) return el("p", { class: "muted" }, "No events.");
  return table(
    "Audit events, newest first",
    [
      { label: "At", cell: (e) => time(e.at), class: "nowrap" },
      { label: "Event", cell: (e) => mono(e.event), class: "nowrap" },
      { label: "Actor", cell: (e) => mono(e.actor) },
      { label: "Task", cell: (e) => (e.task_id ? link(consoleHref("tasks", e.task_id), mono(shortId(e.task_id))) : "—") },
      { label: "Owner", cell: (e) => orDash(e.owner) },
      { label: "Purpose or reason", cell: (e) => el("span", { class: "purpose" }, orDash(e.purpose)) },
      { label: "Detail", cell: (e) => (e.detail && Object.keys(e.detail).length ? el("pre", { class: "json" }, JSON.stringify(e.detail, null, 2)) : "—") },
      { label: "Sealed", cell: (e) => (e.sealed ? "yes" : "not yet") },
    ],
    events,
  );
}

const AUDIT_FIELDS = ["event", "task_id", "workload", "owner", "since"];

export async function auditView() {
  const form = byId("audit-form");
  const error = byId("audit-error");
  const more = byId("audit-more");
  const field = (name) => form.elements.namedItem(name);
  let events = [];
  let cursor = null;
  let query = {};

  const given = new URLSearchParams(window.location.search);
  for (const name of AUDIT_FIELDS) {
    const value = given.get(name) || "";
    field(name).value = name === "since" ? value.replace(/(\.\d+)?Z$/, "") : value;
  }

  const read = () => {
    const wanted = {};
    for (const name of AUDIT_FIELDS) {
      const value = field(name).value.trim();
      if (value) wanted[name] = value;
    }
    if (wanted.task_id && !isUuid(wanted.task_id)) throw new Error("Task id must be a UUID.");
    if (wanted.since) {
      // The picker gives local-looking wall time without an offset; the label says UTC.
      wanted.since = `${wanted.since.length === 16 ? `${wanted.since}:00` : wanted.since}Z`;
    }
    return wanted;
  };

  let latest = 0;
  const load = async (append) => {
    const asked = ++latest;
    const page = await api("GET", "/audit", { query: { ...query, limit: 100, cursor: append ? cursor : null } });
    if (asked !== latest) return; // a newer filter was applied meanwhile; its answer wins
    events = append ? events.concat(page.items) : page.items;
    cursor = page.next_cursor;
    byId("audit-table").replaceChildren(events.length ? auditTable(events) : "");
    show("audit-empty", events.length === 0);
    show(more, Boolean(cursor));
  };

  const apply = async () => {
    show(error, false);
    try {
      query = read();
      // Filters go in the page's own URL so a view can be shared; the token never does.
      window.history.replaceState(null, "", viewHref("audit", query));
      await load(false);
    } catch (failure) {
      error.textContent = describe(failure);
      show(error);
    }
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    apply();
  });
  byId("audit-clear").addEventListener("click", () => {
    form.reset();
    apply();
  });
  more.addEventListener("click", () =>
    load(true).catch((failure) => {
      error.textContent = describe(failure);
      show(error);
    }),
  );
  await apply();
}

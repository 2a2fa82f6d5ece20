// Approver views: what waits for this approver's decision, and one request in full.

import { allPages, api, ApiError, describe, path } from "./api.js";
import { confirmAction, dialogOpen } from "./dialog.js";
import {
  byId,
  consoleHref,
  contextTable,
  el,
  fillPairs,
  link,
  mono,
  orDash,
  show,
  stateBadge,
  table,
  time,
  timeLeft,
} from "./dom.js";

const REFRESH_MS = 10_000;

function requestPairs(task) {
  return [
    ["Task type", mono(task.task)],
    ["Owner", orDash(task.owner)],
    ["Workload", mono(task.workload)],
    ["Purpose", el("span", { class: "purpose" }, orDash(task.purpose))],
    ["Requested", time(task.created_at)],
    ["Decide before", el("span", {}, time(task.approval_expires_at), " (", timeLeft(task.approval_expires_at), " left)")],
  ];
}

function decisionsTable(caption, decisions) {
  if (!decisions || decisions.length === 0) return el("p", { class: "muted" }, "No decisions yet.");
  return table(
    caption,
    [
      { label: "Approver", cell: (d) => orDash(d.approver) },
      { label: "Decision", cell: (d) => stateBadge(d.decision) },
      { label: "Reason", cell: (d) => orDash(d.reason) },
      { label: "At", cell: (d) => time(d.at) },
    ],
    decisions,
  );
}

// Approve or deny, after the confirmation step. Resolves to the task as the API answers it.
function decide(task, decision) {
  const verb = decision === "approve" ? "Approve" : "Deny";
  return confirmAction({
    title: `${verb} this request?`,
    summary:
      decision === "approve"
        ? "The workload may then claim the credentials of this task, once."
        : "The task ends and nothing is issued.",
    details: [
      ["Task type", mono(task.task)],
      ["Owner", orDash(task.owner)],
      ["Workload", mono(task.workload)],
      ["Purpose", orDash(task.purpose)],
    ],
    okLabel: verb,
    okClass: decision === "approve" ? "primary" : "danger",
    action: (reason) => api("POST", path("approvals", task.task_id), { body: { decision, reason } }),
  });
}

export async function approvalsView() {
  const list = byId("approval-list");
  const auto = byId("auto-refresh");
  let busy = false;
  let last = "";

  const render = (items) => {
    list.replaceChildren(
      ...items.map((task) => {
        const node = el(
          "article",
          { class: "card", "data-task-id": task.task_id },
          el("h2", {}, link(consoleHref("approvals", task.task_id), `${task.task} for ${task.owner}`)),
          fillPairs(el("dl", { class: "pairs" }), requestPairs(task)),
          el("h3", {}, "Context"),
          contextTable(`Context of task ${task.task_id}`, task.context),
        );
        const approve = el("button", { type: "button", class: "primary" }, "Approve…");
        const deny = el("button", { type: "button", class: "danger" }, "Deny…");
        approve.setAttribute("aria-label", `Approve ${task.task} for ${task.owner}`);
        deny.setAttribute("aria-label", `Deny ${task.task} for ${task.owner}`);
        const act = (decision) => async () => {
          const result = await decide(task, decision);
          if (result) {
            announce(result);
            await load(true);
          }
        };
        approve.addEventListener("click", act("approve"));
        deny.addEventListener("click", act("deny"));
        node.append(el("div", { class: "actions" }, approve, deny, link(consoleHref("approvals", task.task_id), "Open this request")));
        return node;
      }),
    );
    show("approval-empty", items.length === 0);
  };

  const load = async (force = false) => {
    if (busy) return;
    busy = true;
    try {
      const { items } = await allPages("/approvals");
      const signature = JSON.stringify(items.map((t) => [t.task_id, t.approval && t.approval.decisions.length]));
      if (force || signature !== last) render(items);
      last = signature;
      byId("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } finally {
      busy = false;
    }
  };

  byId("refresh-now").addEventListener("click", () => load(true));
  setInterval(() => {
    if (auto.checked && !dialogOpen() && document.visibilityState === "visible") load().catch(() => {});
  }, REFRESH_MS);
  await load(true);
}

function announce(task) {
  const state = task.approval ? task.approval.state : task.state;
  const node = byId("status");
  node.textContent = `Recorded. Task ${task.task_id} (${task.task} for ${task.owner}): approval ${state}.`;
  node.className = "status ok";
  node.hidden = false;
}

// Find the task among the pages of GET /approvals: the API has no single-approval read.
async function findPending(taskId) {
  const { items } = await allPages("/approvals", {}, 10_000);
  return items.find((task) => task.task_id === taskId) || null;
}

export async function approvalView(roles, taskId) {
  byId("approval-title").textContent = taskId;
  const task = await findPending(taskId);
  if (!task) {
    await notPending(roles, taskId);
    return;
  }
  renderRequest(task);
  const act = (decision) => async () => {
    const result = await decide(task, decision);
    if (!result) return;
    announce(result);
    show("approve", false);
    show("deny", false);
    const state = byId("approval-state");
    state.textContent = `This request is now ${result.approval ? result.approval.state : result.state}.`;
    show(state);
    byId("approval-decisions").replaceChildren(
      decisionsTable("Decisions on this request", result.approval ? result.approval.decisions : []),
    );
  };
  byId("approve").addEventListener("click", act("approve"));
  byId("deny").addEventListener("click", act("deny"));
}

function renderRequest(task) {
  fillPairs("approval-fields", requestPairs(task));
  byId("approval-context").replaceChildren(contextTable("Context of this request", task.context));
  fillPairs("approval-issue", [
    ["Task type", mono(task.task)],
    ["Time to live", `${task.ttl_seconds} seconds, from the claim`],
  ]);
  byId("approval-issue-type").textContent = task.task;
  byId("approval-decisions").replaceChildren(
    decisionsTable("Decisions on this request", task.approval ? task.approval.decisions : []),
  );
  show("approval-request");
}

async function notPending(roles, taskId) {
  const state = byId("approval-state");
  let text =
    "This request is not waiting for your decision: it was decided, lapsed or withdrawn, you already decided it, or your token may not decide it.";
  if (roles.operator) {
    try {
      const task = await api("GET", path("task", taskId));
      const approval = task.approval ? task.approval.state : "none";
      text = `This request is not waiting for your decision. The task is ${task.state}; its approval is ${approval}.`;
      state.replaceChildren(text, " ", link(consoleHref("tasks", taskId), "Open the task"));
      show(state);
      return;
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) text += ` (${describe(error)})`;
    }
  }
  state.textContent = text;
  show(state);
}

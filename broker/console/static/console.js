// Entry point of every console page: sign in or out, find out what the token may do by
// asking the API, then hand over to the view the server named in <main data-view>.

import { api, ApiError, claims, describe, forgetToken, keepToken, token, whenRefused } from "./api.js";
import { byId, duration, show, tickTimeLeft, viewHref } from "./dom.js";
import { approvalView, approvalsView } from "./approver.js";
import { auditView, killSwitchView, leaseView, leasesView, taskView } from "./operator.js";

const VIEWS = {
  home: { needs: null, render: homeView },
  leases: { needs: "operator", render: leasesView },
  lease: { needs: "operator", render: leaseView },
  task: { needs: "operator", render: taskView },
  kill_switch: { needs: "operator", render: killSwitchView },
  audit: { needs: "operator", render: auditView },
  approvals: { needs: "approver", render: approvalsView },
  approval: { needs: "approver", render: approvalView },
};

const main = byId("content");

export function status(message, kind = "info") {
  const node = byId("status");
  node.textContent = message;
  node.className = `status ${kind}`;
  show(node, Boolean(message));
}

function signInPage(message = "") {
  show(main, false);
  show("nav", false);
  show("whoami", false);
  show("sign-in");
  const error = byId("sign-in-error");
  error.textContent = message;
  show(error, Boolean(message));
  byId("token").focus();
}

let refused = false;
whenRefused((message) => {
  if (refused) return; // several calls in flight may all be refused; say it once
  refused = true;
  forgetToken();
  status("");
  signInPage(message);
});

function signIn(event) {
  event.preventDefault();
  const field = byId("token");
  const raw = field.value.trim().replace(/^bearer\s+/i, "");
  field.value = "";
  if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(raw)) {
    signInPage("That is not a JWT: paste the token itself (three dot-separated parts).");
    return;
  }
  keepToken(raw);
  refused = false;
  start();
}

function signOut() {
  forgetToken();
  // A fresh page, so nothing the token could see stays in this document.
  window.location.replace(viewHref(""));
}

async function probe(route) {
  try {
    await api("GET", route, { query: { limit: 1 } });
    return true;
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) return false;
    throw error;
  }
}

// The console never guesses roles from the token's claims: the API's answers decide.
async function discoverRoles() {
  const [operator, approver] = await Promise.all([probe("/leases"), probe("/approvals")]);
  return { operator, approver };
}

function showWhoami(roles) {
  const said = claims(token());
  const name = said.email || said.preferred_username || said.sub || "unknown";
  byId("whoami-name").textContent = String(name);
  const names = [roles.operator && "operator", roles.approver && "approver"].filter(Boolean).join(", ");
  const left = typeof said.exp === "number" ? ` · token expires in ${duration(said.exp * 1000 - Date.now())}` : "";
  byId("whoami-roles").textContent = `${names}${left}`;
  show("whoami");
}

function showAllowed(roles) {
  for (const node of document.querySelectorAll("[data-needs]")) {
    node.hidden = !roles[node.dataset.needs];
  }
  const current = main.dataset.view;
  for (const anchor of document.querySelectorAll("[data-nav]")) {
    if (anchor.dataset.nav === current || (current === "lease" && anchor.dataset.nav === "leases")) {
      anchor.setAttribute("aria-current", "page");
    }
  }
  show("nav");
}

async function start() {
  show("sign-in", false);
  status("Checking what this token may do…");
  let roles;
  try {
    roles = await discoverRoles();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) {
      status(`The broker could not answer: ${describe(error)}`, "error");
    }
    return;
  }
  status("");
  if (!roles.operator && !roles.approver) {
    forgetToken();
    signInPage("This token may act neither as an operator nor as an approver (a workload's token can't use the console).");
    return;
  }
  showWhoami(roles);
  showAllowed(roles);
  show(main);
  const view = VIEWS[main.dataset.view] || VIEWS.home;
  if (view.needs && !roles[view.needs]) {
    const other = roles.operator ? "leases" : "approvals";
    main.replaceChildren();
    const heading = document.createElement("h1");
    heading.textContent = "Not for this token";
    const text = document.createElement("p");
    text.textContent = `This view needs an ${view.needs} token; the API refuses yours. `;
    const anchor = document.createElement("a");
    anchor.setAttribute("href", viewHref(other));
    anchor.textContent = roles.operator ? "Go to active leases" : "Go to approvals";
    text.append(anchor);
    main.append(heading, text);
    return;
  }
  try {
    await view.render(roles, main.dataset.subject);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) status(describe(error), "error");
  }
}

function homeView(roles) {
  // Operators start at the lease inventory; approvers at what waits for them.
  window.location.replace(viewHref(roles.operator ? "leases" : "approvals"));
}

byId("sign-in-form").addEventListener("submit", signIn);
byId("sign-out").addEventListener("click", signOut);
setInterval(tickTimeLeft, 1000);
if (token()) start();
else signInPage();

// The confirmation step before anything that changes state: a modal dialog that names what
// will happen and asks for the reason the API records in the audit log.

import { describe } from "./api.js";
import { byId, fillPairs, show } from "./dom.js";

let open = false;

export function dialogOpen() {
  return open;
}

// Resolves to the action's result, or null if the user cancelled.
export function confirmAction({ title, summary, details = [], okLabel, okClass = "danger", action }) {
  const dialog = byId("confirm");
  const form = byId("confirm-form");
  const reason = byId("confirm-reason");
  const ok = byId("confirm-ok");
  const error = byId("confirm-error");
  byId("confirm-title").textContent = title;
  byId("confirm-summary").textContent = summary;
  fillPairs("confirm-details", details);
  reason.value = "";
  ok.textContent = okLabel;
  ok.className = okClass;
  ok.disabled = false;
  show(error, false);

  return new Promise((resolve) => {
    const listening = new AbortController();
    const finish = (result) => {
      listening.abort();
      open = false;
      if (dialog.open) dialog.close();
      resolve(result);
    };
    form.addEventListener(
      "submit",
      async (event) => {
        event.preventDefault();
        const text = reason.value.trim();
        if (!text) {
          error.textContent = "Give a reason: it is recorded in the audit log.";
          show(error);
          reason.focus();
          return;
        }
        ok.disabled = true;
        try {
          finish(await action(text));
        } catch (failure) {
          error.textContent = `The broker refused: ${describe(failure)}`;
          show(error);
          ok.disabled = false;
        }
      },
      { signal: listening.signal },
    );
    reason.addEventListener("input", () => show(error, false), { signal: listening.signal });
    byId("confirm-cancel").addEventListener("click", () => finish(null), { signal: listening.signal });
    // Escape closes a modal dialog; treat it as Cancel.
    dialog.addEventListener("cancel", () => finish(null), { signal: listening.signal });
    open = true;
    dialog.showModal();
    reason.focus();
  });
}

// Live worklist: rows arrive as server-rendered (escaped) HTML over server-sent events;
// acknowledging posts the form with its CSRF token and waits for the row to come back acked.
"use strict";
(function () {
  const list = document.getElementById("alerts");
  const live = document.getElementById("live");
  const empty = document.getElementById("empty");

  function place(html) {
    const tpl = document.createElement("template");
    tpl.innerHTML = html.trim();
    const row = tpl.content.firstElementChild;
    if (!row) return;
    const old = document.getElementById(row.id);
    if (old) old.replaceWith(row); else list.prepend(row);
    empty.hidden = true;
  }

  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("open", () => { live.dataset.state = "open"; live.textContent = "live"; });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {  // refused: the session is gone
        window.location.assign("/login");
        return;
      }
      live.dataset.state = "error"; live.textContent = "reconnecting…";
    });
    source.addEventListener("row", (ev) => place(JSON.parse(ev.data).html));
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (!form.classList.contains("ack")) return;
    ev.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    const resp = await fetch(form.action, {
      method: "POST", body: new URLSearchParams(new FormData(form)),
      headers: { "Accept": "application/json" }, credentials: "same-origin",
    });
    if (resp.ok) place((await resp.json()).html); else button.disabled = false;
  });

  connect();
})();

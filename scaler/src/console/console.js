// Fetches the panels again every step and puts them in place: the only
// script of the console. Same origin only (the page's CSP says so too).
"use strict";
const main = document.querySelector("main");
const live = document.getElementById("live");
const every = Number(main.dataset.refreshMs) || 5000;
let refreshes = 0;

async function refresh() {
  try {
    const response = await fetch("/console/panels" + location.search, {
      cache: "no-store",
      credentials: "same-origin",
    });
    if (!response.ok) {
      live.textContent = response.status === 401 ? "signed out: reload" : "scaler answered " + response.status;
      live.className = "alert";
      return;
    }
    main.innerHTML = await response.text();
    refreshes += 1;
    document.body.dataset.refreshes = String(refreshes);
    live.textContent = "live · " + new Date().toLocaleTimeString();
    live.className = "";
  } catch (error) {
    live.textContent = "scaler unreachable: retrying";
    live.className = "alert";
  }
}

setInterval(refresh, every);

// kiln dashboard: draws the charts a page embeds as JSON and keeps live panels fresh.
// Loaded with `defer` after plotly.min.js, so the document is parsed when this runs.
"use strict";

(function () {
  function figureOf(div) {
    const source = document.getElementById(div.dataset.figure);
    return source ? JSON.parse(source.textContent) : null;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "—";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return String(value);
    return value.toPrecision(digits || 4);
  }

  const charts = {};
  document.querySelectorAll(".chart[data-figure]").forEach(function (div) {
    const figure = figureOf(div);
    if (figure && window.Plotly) {
      charts[div.id] = figure.config;
      window.Plotly.newPlot(div, figure.data, figure.layout, figure.config);
    }
  });

  function redraw(id, figure) {
    const div = document.getElementById(id);
    if (div && window.Plotly) window.Plotly.react(div, figure.data, figure.layout, charts[id]);
  }

  // ---- the job page: poll its state every second while it runs --------------------
  const job = document.getElementById("job");
  if (job && job.dataset.finished !== "true") {
    const logs = document.getElementById("job-logs");
    let after = Number(logs.dataset.after || 0);
    let busy = false;
    const timer = window.setInterval(tick, 1000);

    // Once the job ends, the parts the server renders from its outcome (facts with the
    // model link and finish time, resources, result tables) are taken from a fresh copy
    // of the page; DOMParser runs no script, and the charts and logs stay as they are.
    async function swapFinished() {
      const response = await fetch(window.location.pathname,
        { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      document.querySelectorAll("[data-live-swap]").forEach(function (part) {
        const replacement = fresh.getElementById(part.id);
        if (replacement) part.replaceWith(document.adoptNode(replacement));
      });
    }

    async function tick() {
      if (busy) return;
      busy = true;
      try {
        const response = await fetch("/jobs/" + encodeURIComponent(job.dataset.job) +
          "/live.json?after=" + after, { cache: "no-store", credentials: "same-origin" });
        if (response.status === 401) {  // signed out (or the key was revoked)
          window.clearInterval(timer);
          window.location.reload();
          return;
        }
        if (!response.ok) return;
        const state = await response.json();
        const badge = document.querySelector("#job-state .badge");
        badge.textContent = state.state;
        badge.className = "badge state-" + state.state;
        const progress = document.getElementById("job-progress");
        progress.max = state.bar.max;
        progress.value = state.bar.value;
        document.getElementById("job-progress-text").textContent = state.bar.text;
        const error = document.getElementById("job-error");
        if (state.error) {
          error.textContent = state.error;
          error.hidden = false;
        }
        for (const line of state.logs) {
          const span = document.createElement("span");
          span.className = "log-" + line.level;
          span.textContent = line.time + " [" + line.attempt + "] " + line.level + ": " +
            line.message + "\n";
          logs.appendChild(span);
          after = Math.max(after, line.id);
        }
        redraw("loss-chart", state.figures.loss);
        redraw("validation-chart", state.figures.validation);
        job.dataset.points = String(state.points);
        if (state.finished) {
          window.clearInterval(timer);
          const cancel = document.getElementById("cancel-form");
          if (cancel) cancel.hidden = true;
          await swapFinished();
          job.dataset.finished = "true";
        }
      } catch (err) {
        // a dropped connection: try again on the next tick
      } finally {
        busy = false;
      }
    }
  }

  // ---- the deployment page: the live panel, every two seconds ---------------------
  const panel = document.getElementById("live-panel");
  if (panel) {
    let previous = null;
    window.setInterval(async function () {
      try {
        const response = await fetch(panel.dataset.url, { cache: "no-store" });
        if (!response.ok) return;
        const live = await response.json();
        const stats = live.stats;
        if (stats.requests_per_s === null && previous && live.time > previous.time) {
          // no serving window: a rate from two polls of the Prometheus totals
          stats.requests_per_s =
            (live.totals.requests - previous.requests) / (live.time - previous.time);
        }
        previous = { time: live.time, requests: live.totals.requests };
        panel.querySelectorAll("[data-stat]").forEach(function (cell) {
          const value = stats[cell.dataset.stat];
          cell.textContent = fmt(value, 3) + (value === null ? "" : cell.dataset.unit);
        });
        panel.querySelectorAll("[data-total]").forEach(function (cell) {
          cell.textContent = fmt(live.totals[cell.dataset.total], 6);
        });
        document.getElementById("panel-source").textContent = "(" + live.source + ")";
        if (live.traffic) redraw("traffic-chart", live.traffic);
        const table = document.getElementById("version-traffic");
        const body = table.tBodies[0];
        body.replaceChildren();
        for (const [version, counts] of Object.entries(live.versions || {})) {
          const row = body.insertRow();
          for (const text of ["v" + version, counts.requests, counts.rows, counts.errors]) {
            row.insertCell().textContent = fmt(text, 6);
          }
        }
        table.hidden = body.rows.length === 0;
      } catch (err) {
        // try again on the next tick
      }
    }, 2000);
  }
})();

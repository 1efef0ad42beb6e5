// The overview's live parts: every 5 s, the figures of /console/overview.json fill the
// partition and lane tables and redraw the two bar charts. No other page runs any script.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 5000;

function seconds(value) {
  if (value < 60) return value.toFixed(1) + " s";
  if (value < 3600) return (value / 60).toFixed(1) + " min";
  return (value / 3600).toFixed(1) + " h";
}

function drawBars(svg, values, css) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const width = 300, height = 60, top = Math.max(1, ...values);
  const step = width / Math.max(1, values.length);
  values.forEach((value, i) => {
    const bar = document.createElementNS(SVG, "rect");
    const h = value ? Math.max(1, (value / top) * (height - 2)) : 0;
    bar.setAttribute("x", String(i * step + 1));
    bar.setAttribute("y", String(height - h));
    bar.setAttribute("width", String(Math.max(1, step - 2)));
    bar.setAttribute("height", String(h));
    bar.setAttribute("class", css);
    const title = document.createElementNS(SVG, "title");
    title.textContent = String(value);
    bar.appendChild(title);
    svg.appendChild(bar);
  });
  document.getElementById(svg.id + "-max").textContent = "highest " + top;
}

function fillRow(row, values) {
  if (!row) return;
  for (const cell of row.querySelectorAll("[data-field]")) {
    const value = values[cell.dataset.field];
    cell.textContent = cell.dataset.field === "oldest_age" ? seconds(value) : String(value);
  }
}

function fill(data) {
  for (const p of data.partitions) {
    fillRow(document.querySelector('#partitions tr[data-partition="' + p.partition + '"]'), p);
    for (const lane of p.lanes) {
      const selector = '#lanes tr[data-partition="' + p.partition + '"][data-lane="' +
        lane.priority + '"]';
      fillRow(document.querySelector(selector), lane);
    }
  }
  drawBars(document.getElementById("chart-done"), data.counts.map((c) => c.done), "bar-done");
  drawBars(
    document.getElementById("chart-failed"),
    data.counts.map((c) => c.failed + c.cancelled),
    "bar-failed",
  );
  document.getElementById("live").dataset.updated = String(data.now);
}

async function refresh(source) {
  try {
    const answer = await fetch(source, { credentials: "same-origin", cache: "no-store" });
    if (answer.ok) fill(await answer.json());
  } catch (error) {
    // A missed refresh is retried on the next tick; the page keeps its last figures.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (!live) return;
  const source = live.dataset.source;
  refresh(source);
  setInterval(() => refresh(source), REFRESH_MS);
});

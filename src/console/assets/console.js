// The console's only script: a bulk redrive's live progress (server-sent events). Every
// page works without it; it only keeps the progress page current.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const bulk = document.getElementById("bulk");
  if (!bulk) return;
  const source = new EventSource(bulk.dataset.events);
  const set = (id, text) => {
    const node = document.getElementById(id);
    if (node) node.textContent = text;
  };
  const show = (progress) => {
    const bar = document.getElementById("bar");
    const max = Math.max(progress.expected || 0, progress.examined, 1);
    bar.max = max;
    bar.value = progress.examined;
    set("examined", progress.expected ? `${progress.examined} of about ${progress.expected}` : `${progress.examined}`);
    for (const name of ["redriven", "skipped_complete", "exhausted", "failed", "filtered_out"]) {
      set(name, `${progress[name]}`);
    }
    const recent = document.getElementById("recent");
    recent.replaceChildren(...progress.recent.map(([id, key, action]) => {
      const item = document.createElement("li");
      item.textContent = `${id} ${key} — ${action}`;
      return item;
    }));
    if (progress.summary) {
      set("summary", progress.summary);
      document.getElementById("summary").hidden = false;
    }
    if (progress.error) {
      set("error", progress.error);
      document.getElementById("error").hidden = false;
    }
  };
  source.addEventListener("progress", (event) => show(JSON.parse(event.data)));
  source.addEventListener("done", (event) => {
    show(JSON.parse(event.data));
    source.close();
  });
});

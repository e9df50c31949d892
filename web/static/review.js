// blastq review station: worklist refresh, gallery keyboard review. Calls the JSON API (/api/...).
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

  async function api(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.detail || response.statusText);
    return data;
  }

  // Worklist: counts change as workers finish; the rows are fetched again every few seconds.
  const poll = document.querySelector("table[data-poll]");
  if (poll) {
    setInterval(async () => {
      const response = await fetch(poll.dataset.poll, { credentials: "same-origin" });
      if (response.ok) document.getElementById("worklist-rows").innerHTML = await response.text();
    }, 5000);
  }

  // An image in no sample: made a sample of its own, then opened.
  document.querySelectorAll("button[data-review-image]").forEach((button) => {
    button.addEventListener("click", async () => {
      try {
        const review = await api(`/api/images/${button.dataset.reviewImage}/review`);
        window.location = `/samples/${review.sample_id}`;
      } catch (e) { button.textContent = e.message; }
    });
  });

  const sample = document.getElementById("sample");
  if (!sample) return;
  // A cell without a crop (a whole slide's, or recorded before galleries): say so instead of a broken image.
  const noCrop = (img) => img.replaceWith(Object.assign(document.createElement("div"), {
    className: "nocrop", textContent: "no crop: open it on its image (o)",
  }));
  document.querySelectorAll("figure.cell img").forEach((img) => {
    if (img.complete && img.naturalWidth === 0 && img.getAttribute("src")) noCrop(img);
    else img.addEventListener("error", () => noCrop(img), { once: true });
  });
  const sampleId = sample.dataset.sample;
  const locked = sample.dataset.locked === "true";
  const message = document.getElementById("message");
  const keys = {};
  document.querySelectorAll(".keys kbd").forEach((k) => {
    const name = k.nextSibling.textContent.trim().replace(/[,;]$/, "");
    keys[k.textContent] = name;
  });
  delete keys["o"];
  const say = (text, bad) => { message.textContent = text; message.classList.toggle("error", !!bad); };
  const cells = () => Array.from(document.querySelectorAll("figure.cell"));
  let focus = 0;
  const selected = new Set();

  function show() {
    const all = cells();
    if (!all.length) return;
    focus = Math.max(0, Math.min(focus, all.length - 1));
    all.forEach((c, i) => {
      c.classList.toggle("focus", i === focus);
      c.classList.toggle("selected", selected.has(c.dataset.cell));
    });
    all[focus].scrollIntoView({ block: "nearest" });
  }

  function move(step) {
    const all = cells();
    if (step === "up" || step === "down") {
      // The cell above or below: the nearest in the row before or after, by position on screen.
      const here = all[focus].getBoundingClientRect();
      const candidates = all
        .map((c, i) => ({ i, r: c.getBoundingClientRect() }))
        .filter(({ r }) => (step === "down" ? r.top > here.top + 5 : r.top < here.top - 5));
      if (!candidates.length) return;
      const rowTop = step === "down" ? Math.min(...candidates.map((c) => c.r.top)) : Math.max(...candidates.map((c) => c.r.top));
      const row = candidates.filter((c) => Math.abs(c.r.top - rowTop) < 5);
      row.sort((a, b) => Math.abs(a.r.left - here.left) - Math.abs(b.r.left - here.left));
      focus = row[0].i;
    } else {
      focus += step;
    }
    show();
  }

  function render(review) {
    // The figures after review, and each changed cell moved to its new group.
    const after = review.after;
    const cell = (name) => after.differential[name] || { count: 0, percent: 0 };
    document.querySelectorAll("[data-figure]").forEach((td) => {
      const f = td.dataset.figure;
      if (f === "white_cells") td.textContent = after.white_cells;
      else if (f === "blast_percent") td.textContent = after.blast_percent.toFixed(1) + "%";
      else if (f === "verdict") td.textContent = after.verdict;
      else td.textContent = `${cell(f).count} (${cell(f).percent.toFixed(1)}%)`;
    });
    const byKey = new Map(review.cells.map((c) => [c.key, c]));
    cells().forEach((figure) => {
      const c = byKey.get(figure.dataset.cell);
      if (!c || c.current === figure.dataset.class) return;
      figure.dataset.class = c.current;
      figure.classList.toggle("changed", c.current !== c.analyser);
      figure.querySelector("figcaption").innerHTML = "";
      figure.querySelector("figcaption").append(c.current + " ");
      if (c.current !== c.analyser) {
        const s = document.createElement("s");
        s.textContent = c.analyser;
        figure.querySelector("figcaption").append(s);
      }
      document.querySelector(`div.cells[data-group="${c.current}"]`).append(figure);
    });
    // Counts from the review (a class may have more cells than the page shows).
    const totals = {};
    review.cells.forEach((c) => { totals[c.current] = (totals[c.current] || 0) + 1; });
    document.querySelectorAll("h2[data-group]").forEach((h) => {
      h.querySelector("small").textContent = `(${totals[h.dataset.group] || 0})`;
    });
    const state = document.getElementById("state");
    state.textContent = review.state + (review.version > 1 ? ` (version ${review.version})` : "");
  }

  async function reclassify(to) {
    if (locked) { say("This sample cannot be changed here (signed off, or your role may not reclassify).", true); return; }
    const all = cells();
    const target = selected.size ? Array.from(selected) : [all[focus].dataset.cell];
    // Where the reviewer goes next: the first cell after the focused one that is not being moved, so
    // working through a group by keys alone never lands on a cell just reclassified.
    const moving = new Set(target);
    const next = all.slice(focus + 1).find((c) => !moving.has(c.dataset.cell)) ||
      all.slice(0, focus).reverse().find((c) => !moving.has(c.dataset.cell));
    try {
      const review = await api(`/api/samples/${sampleId}/reclassify`, { cells: target, to });
      render(review);
      selected.clear();
      say(`${target.length} cell(s) → ${to}. Blasts ${review.after.blast_percent.toFixed(1)}%: ${review.after.verdict}.`);
      if (next) focus = cells().indexOf(next);
      show();
    } catch (e) { say(e.message, true); }
  }

  document.getElementById("gallery").addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const k = event.key;
    if (k === "ArrowRight") move(1);
    else if (k === "ArrowLeft") move(-1);
    else if (k === "ArrowDown") move("down");
    else if (k === "ArrowUp") move("up");
    else if (k === " ") {
      const key = cells()[focus].dataset.cell;
      selected.has(key) ? selected.delete(key) : selected.add(key);
      show();
    } else if (k === "o") {
      const c = cells()[focus];
      window.location = `/results/${c.dataset.result}/view?sample=${sampleId}&cell=${c.dataset.id}#cell-${c.dataset.id}`;
    } else if (keys[k]) reclassify(keys[k]);
    else return;
    event.preventDefault();
  });

  document.getElementById("gallery").addEventListener("click", (event) => {
    const figure = event.target.closest("figure.cell");
    if (!figure) return;
    const all = cells();
    const index = all.indexOf(figure);
    if (event.shiftKey && all[focus]) {
      const [a, b] = [Math.min(focus, index), Math.max(focus, index)];
      all.slice(a, b + 1).forEach((c) => selected.add(c.dataset.cell));
    } else if (event.ctrlKey || event.metaKey) {
      const key = figure.dataset.cell;
      selected.has(key) ? selected.delete(key) : selected.add(key);
    } else {
      selected.clear();
    }
    focus = index;
    document.getElementById("gallery").focus();
    show();
  });

  document.querySelectorAll("button[data-action]").forEach((button) => {
    button.addEventListener("click", async () => {
      const action = button.dataset.action;
      let body = {};
      if (action === "amend") {
        const reason = window.prompt("Why is this signed result amended?");
        if (!reason) return;
        body = { reason };
      }
      try {
        await api(`/api/samples/${sampleId}/${action}`, body);
        window.location.reload();
      } catch (e) { say(e.message, true); }
    });
  });

  show();
})();

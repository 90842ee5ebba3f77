/* glimpse ui: the form, the live run and the history. Plain JavaScript, no dependencies.
 *
 * A run's events come from the server as server-sent events (see glimpse/ui/live.py): `text` pieces are added to
 * the turn being written, each `turn` redraws its sample's column with the viewer's own functions (GLIMPSE.view,
 * from /view/app.js), `done` shows the vote. Everything the model wrote goes into text nodes, never into HTML.
 * Wrapped in a function so its names stay apart from the viewer's (both are classic scripts).
 */
(() => {
  "use strict";
  const V = window.GLIMPSE.view;
  const h = V.h; // the viewer's element builder: children become text nodes
  const $ = (id) => document.getElementById(id);
  const ui = { defaults: null, upload: null, run: null, source: null, decoding: null };

  // ---------------------------------------------------------------------------------------------------- the form
  async function api(path, options) {
    const response = await fetch(path, options);
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
    return data;
  }

  async function loadDefaults() {
    const d = (ui.defaults = await api("/api/defaults"));
    $("model").value = d.model;
    $("base-url").value = d.base_url;
    $("protocol").value = d.protocol;
    $("effort").value = d.effort;
    $("samples").value = d.samples;
    $("samples").max = d.max_samples;
    $("code").checked = d.code;
    $("path-row").hidden = !d.local_paths;
    $("models").replaceChildren(...["builtin", "expert", "openai:", "hf:", "scripted:"].map((v) => h("option", { value: v })));
  }

  async function upload(file) {
    $("form-error").textContent = "";
    $("drop-label").textContent = `uploading ${file.name}…`;
    try {
      const got = await api("/api/images", { method: "POST", body: file,
        headers: { "Content-Type": file.type || "application/octet-stream", "X-File-Name": encodeURIComponent(file.name) } });
      ui.upload = got.id;
      $("path").value = "";
      const preview = h("img", { src: URL.createObjectURL(file), alt: "" });
      $("drop-label").replaceChildren(preview, `${file.name} · ${got.width}×${got.height}`);
    } catch (e) {
      ui.upload = null;
      $("drop-label").textContent = "Drop an image here, or click to choose one";
      $("form-error").textContent = String(e.message || e);
    }
  }

  function wireDrop() {
    const drop = $("drop");
    $("file").addEventListener("change", (e) => e.target.files[0] && upload(e.target.files[0]));
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
    });
    $("path").addEventListener("input", () => { if ($("path").value) ui.upload = null; });
  }

  async function submit(e) {
    e.preventDefault();
    $("form-error").textContent = "";
    const body = {
      question: $("question").value, model: $("model").value, base_url: $("base-url").value,
      protocol: $("protocol").value, effort: $("effort").value, samples: Number($("samples").value),
      code: $("code").checked,
    };
    if (ui.upload) body.image = ui.upload;
    else body.path = $("path").value;
    try {
      const { id } = await api("/api/runs", { method: "POST", body: JSON.stringify(body),
        headers: { "Content-Type": "application/json" } });
      follow(id);
    } catch (err) {
      $("form-error").textContent = String(err.message || err);
    }
  }

  // ------------------------------------------------------------------------------------------------- a live run
  function follow(id) {
    if (ui.source) ui.source.close();
    ui.run = { id, columns: {}, trajectories: {}, done: false };
    ui.decoding = null;
    history.replaceState(null, "", `#run=${id}`); // a reload follows the same run (its events replay)
    $("run").disabled = true;
    $("stop").disabled = false;
    const source = (ui.source = new EventSource(`/api/runs/${id}/events`));
    const on = (type, fn) => source.addEventListener(type, (e) => fn(JSON.parse(e.data)));
    on("start", started);
    on("text", text);
    on("turn", turn);
    on("done", done);
    on("failed", (ev) => finish(h("span", { class: "error-text" }, `The run failed: ${ev.error}`)));
    on("end", () => source.close());
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED || ui.run.done) return; // a dropped connection reconnects itself
      $("form-error").textContent = `Run ${id} is no longer on this server; past runs are in the history.`;
      finish("gone");
    };
  }

  function started(ev) {
    const run = ui.run;
    run.samples = ev.samples;
    run.width = ev.width;
    run.height = ev.height;
    run.src = `/api/runs/${ev.id}/image`;
    ui.decoding = decoded(run.src);
    const s = ev.settings;
    const columns = h("div", { class: "columns" });
    for (let i = 0; i < ev.samples; i++) {
      const col = h("div", { class: "column", "data-sample": i });
      run.columns[i] = col;
      columns.append(col);
      col.append(h("div", { class: "panel" }, h("h3", {}, ev.samples > 1 ? `Sample ${i + 1}` : "Trajectory"),
        h("img", { class: "original", src: run.src, alt: "the image", style: "max-width:100%" })));
    }
    $("live").replaceChildren(
      h("div", { class: "panel" },
        h("div", { class: "status" }, h("strong", { id: "status" }, "running…"),
          h("span", { class: "muted" }, `${s.model} · ${s.protocol} protocol · effort ${s.effort}`
            + ` · ${ev.width}×${ev.height} px`)),
        h("h2", {}, "Question"), h("div", { class: "question" }, ev.question), h("div", { id: "vote" })),
      columns);
  }

  async function decoded(src) {
    /* The original decoded once and kept: crops are cut from it on every turn, and a large image drawn from its
     * <img> may be decoded again for each canvas. The expandos let the viewer's drawRegion read its size. */
    const img = await V.loadImage(src);
    const bitmap = await createImageBitmap(img).catch(() => null);
    if (!bitmap) return img;
    bitmap.naturalWidth = bitmap.width;
    bitmap.naturalHeight = bitmap.height;
    return bitmap;
  }

  function liveCard(sample, index) {
    /* The card of the turn being written in `sample`'s column (made when its first piece arrives). */
    const col = ui.run.columns[sample];
    let card = col.querySelector(".turn.live");
    if (card && Number(card.dataset.turn) !== index) {
      card.remove();
      card = null;
    }
    if (!card) {
      card = h("div", { class: "panel turn live", "data-turn": index },
        h("div", { class: "head" }, h("strong", {}, `Turn ${index + 1}`), h("span", { class: "muted" }, "writing…")),
        h("pre", { class: "stream" }));
      col.append(card);
    }
    return card;
  }

  function text(ev) {
    if (!ui.run || !ui.run.columns[ev.sample]) return;
    const pre = liveCard(ev.sample, ev.turn).querySelector("pre.stream");
    if (ev.restart) pre.textContent = "";
    pre.append(document.createTextNode(ev.text));
  }

  async function drawColumn(sample, t) {
    /* Redraw a column from its trajectory so far: the original with every zoom, then one card per turn. */
    const col = ui.run.columns[sample];
    const version = (col.version = (col.version || 0) + 1);
    const made = {};
    for (const turn of t.turns) {
      for (const m of turn.made) made[m.observation_index] = `/api/runs/${ui.run.id}/made/${sample}/${m.observation_index}`;
    }
    t.view = { src: ui.run.src, made };
    const img = await (ui.decoding || Promise.reject(new Error("no image"))).catch(() => null);
    if (col.version !== version) return; // a later turn has been drawn meanwhile
    const head = h("div", { class: "panel" },
      h("h3", {}, ui.run.samples > 1 ? `Sample ${sample + 1} ` : "Trajectory ",
        t.stop_reason ? h("span", { class: `badge ${t.stop_reason === "answer" ? "ok" : "warn"}` }, t.stop_reason) : null),
      V.kv([["answer", t.answer], ["turns", t.turns.length], ["seconds", t.wall_s ? V.fmt(t.wall_s) : null],
        ["error", t.error]]));
    const live = col.querySelector(".turn.live");
    const regs = V.regions(t);
    col.cards = col.cards || []; // a finished turn never changes: each card is drawn once
    const cards = t.turns.map((turn) => col.cards[turn.index] || (col.cards[turn.index] = V.turnCard(t, turn, img, regs)));
    const parts = [head, img ? V.originalPanel(t, ui.run.src) : null, ...cards];
    if (live && Number(live.dataset.turn) >= t.turns.length && !t.stop_reason) parts.push(live);
    col.replaceChildren(...parts.filter((p) => p));
  }

  function turn(ev) {
    if (!ui.run || !ui.run.columns[ev.sample]) return;
    ui.run.trajectories[ev.sample] = ev.trajectory;
    drawColumn(ev.sample, ev.trajectory);
  }

  async function done(ev) {
    const run = ui.run;
    run.done = true;
    await Promise.all(ev.trajectories.map((t) => (t.image ? drawColumn(t.sample_index, t) : null)));
    for (const t of ev.trajectories) {
      if (!t.image) run.columns[t.sample_index].append(h("div", { class: "missing" }, t.error || t.stop_reason));
    }
    for (const card of document.querySelectorAll(".turn.live")) card.remove();
    const v = ev.vote;
    const agree = v.answer === null ? "" : ` · ${v.agree || 0} of ${v.total} agree`;
    $("vote").replaceChildren(h("p", { class: "vote" },
      v.answer === null ? h("strong", {}, "No answer") : [h("strong", {}, "Answer: "), h("span", { id: "answer" }, v.answer)],
      h("span", { class: "muted" }, `${agree} · ${ev.status} · saved to ${ev.saved}`)));
    finish(ev.status === "stopped" ? "stopped" : "finished");
    loadHistory();
  }

  function finish(status) {
    const el = $("status");
    if (el) el.replaceChildren(status);
    $("run").disabled = false;
    $("stop").disabled = true;
    if (ui.source) ui.source.close();
  }

  async function stop() {
    if (!ui.run) return;
    $("stop").disabled = true;
    await api(`/api/runs/${ui.run.id}/stop`, { method: "POST" }).catch((e) => {
      $("form-error").textContent = String(e.message || e);
    });
  }

  // ----------------------------------------------------------------------------------------------------- history
  async function loadHistory() {
    const rows = await api("/api/history").catch(() => []);
    $("history").replaceChildren(...rows.map((r) => h("li", { "data-run": r.id },
      h("a", { href: r.url, target: "_blank" }, r.question || r.id), " ",
      h("span", { class: "muted" }, `${r.answer === null ? r.status : r.answer} · ${r.model || ""}`))));
  }

  $("ask").addEventListener("submit", submit);
  $("stop").addEventListener("click", stop);
  wireDrop();
  loadDefaults().catch((e) => { $("form-error").textContent = String(e.message || e); });
  loadHistory();
  const resumed = location.hash.match(/^#run=([0-9a-f-]+)$/);
  if (resumed) follow(resumed[1]);
})();

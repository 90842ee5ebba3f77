/* Glimpse report viewer. Plain JavaScript, no dependencies; works opened from disk (file://) and when served.
 *
 * Data: data/run.js sets GLIMPSE.runs (config and summary of each run), data/index.js sets GLIMPSE.index (one
 * small row per trajectory), and data/traj/N.js calls GLIMPSE.loaded(N, trajectory) when a page needs it. Script
 * tags are used instead of fetch() because browsers refuse fetch() on file:// pages.
 * Routes: #/ (overview and list) and #/t/N (trajectory N). `glimpse ui` loads this file too, as a library of the
 * trajectory drawing (GLIMPSE.view), without routing.
 */
"use strict";

const G = window.GLIMPSE || { runs: [], index: [] };
const PAGE_SIZE = 50;
const COLORS = { zoom: "#e8590c", gold: "#0f9d58", pending: "#7c3aed" };
const state = {
  status: "all", overTurn: false, toolError: false, level: "", category: "", cap: "", compare: "all", q: "",
  sort: "i", dir: 1, page: 0,
};

// ---------------------------------------------------------------------------------------------------- helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1));
const fmt = (v, d = 2) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
// Failures that are not the model's (counted apart from accuracy) are named as such, not as "not scored".
const UNSCORED = { backend_error: "backend error", input_error: "input error", judge_error: "judge error" };

function badge(ok, method) {
  if (ok === true) return h("span", { class: "badge ok" }, "correct");
  if (ok === false) return h("span", { class: "badge bad" }, "wrong");
  if (UNSCORED[method]) return h("span", { class: "badge warn" }, UNSCORED[method]);
  return h("span", { class: "badge none" }, "not scored");
}
function kv(pairs) {
  const box = h("div", { class: "kv" });
  for (const [k, v] of pairs) box.append(h("div", {}, k), h("div", {}, v === null || v === undefined ? "–" : v));
  return box;
}

// ------------------------------------------------------------------------------------------------ data loading
const trajectories = {};
const waiting = {};
G.loaded = function (n, data) {
  trajectories[n] = data;
  (waiting[n] || []).forEach((resolve) => resolve(data));
  delete waiting[n];
};
function loadTrajectory(n) {
  if (trajectories[n]) return Promise.resolve(trajectories[n]);
  return new Promise((resolve, reject) => {
    (waiting[n] = waiting[n] || []).push(resolve);
    if (waiting[n].length > 1) return;
    const tag = document.createElement("script");
    tag.src = `data/traj/${n}.js`;
    tag.onerror = () => reject(new Error(`cannot load data/traj/${n}.js`));
    document.head.append(tag);
  });
}
const images = {};
function loadImage(src) {
  if (!images[src]) {
    images[src] = new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error(`cannot load ${src}`));
      img.src = src;
    });
  }
  return images[src];
}

// ---------------------------------------------------------------------------------------------------- overview
// An accuracy as shown: "not scored" when units ran but none had a gold answer (e.g. a glimpse ask file), "–" when
// none ran (every backend call failed); accuracies are over the units that ran, never counting failures as wrong.
function accuracy(s, v) {
  if ((v === null || v === undefined) && s.ran && !s.scored) return "not scored";
  return pct(v);
}
function ranCell(s) {
  const ran = s.ran === undefined ? s.trajectories : s.ran;
  return ran === s.trajectories ? ran : `${ran} of ${s.trajectories}`;
}

function summaryTable(run) {
  const rows = Object.entries(run.summary.caps || {}).sort((a, b) => Number(a[0]) - Number(b[0]));
  const head = ["turn cap", "questions", "units ran", "Avg@k", "pass@k", "majority@k", "chance", "mean turns",
    "over-turn %", "tool errors %", "faithful %", "input errors", "backend errors", "judge errors"];
  return h("table", { class: "summary" },
    h("thead", {}, h("tr", {}, head.map((c, i) => h("th", { class: i ? "num" : "" }, c)))),
    h("tbody", {}, rows.map(([cap, s]) => h("tr", {},
      h("td", {}, cap), h("td", { class: "num" }, s.questions), h("td", { class: "num" }, ranCell(s)),
      h("td", { class: "num" }, accuracy(s, s.accuracy.avg)),
      h("td", { class: "num" }, accuracy(s, s.accuracy.pass)),
      h("td", { class: "num" }, accuracy(s, s.accuracy.majority)),
      h("td", { class: "num" }, pct(s.chance)), h("td", { class: "num" }, fmt(s.turns_mean)),
      h("td", { class: "num" }, pct(s.over_turn_rate)), h("td", { class: "num" }, pct(s.tool_error_rate)),
      h("td", { class: "num" }, pct(s.faithfulness.covered_rate)), h("td", { class: "num" }, s.input_errors),
      h("td", { class: "num" }, s.backend_errors), h("td", { class: "num" }, s.judge_errors)))));
}

function bars(title, counts) {
  const entries = Object.entries(counts || {});
  if (!entries.length) return h("div", { class: "panel" }, h("h3", {}, title), h("p", { class: "muted" }, "none"));
  const top = Math.max(1, ...entries.map(([, v]) => v));
  return h("div", { class: "panel" }, h("h3", {}, title),
    h("div", { class: "bars" }, entries.flatMap(([k, v]) => [
      h("span", {}, k), h("div", { class: "bar", style: `width:${(100 * v) / top}%` }), h("span", { class: "num" }, v)])));
}

function breakdown(s) {
  return Object.entries(s.by || {}).map(([field, groups]) => h("div", { class: "panel" }, h("h3", {}, `By ${field}`),
    h("table", {}, h("thead", {}, h("tr", {}, [field, "n", "Avg@k", "pass@k", "majority@k", "backend errors"].map(
      (c, i) => h("th", { class: i ? "num" : "" }, c)))),
    h("tbody", {}, Object.entries(groups).map(([name, g]) => h("tr", {}, h("td", {}, name),
      h("td", { class: "num" }, g.n), h("td", { class: "num" }, pct(g.avg)), h("td", { class: "num" }, pct(g.pass)),
      h("td", { class: "num" }, pct(g.majority)), h("td", { class: "num" }, g.backend_errors || 0)))))));
}

function runSection(run, label) {
  const caps = Object.keys(run.summary.caps || {}).map(Number).sort((a, b) => a - b);
  const last = run.summary.caps[String(caps[caps.length - 1])] || null;
  const cfg = run.config || {};
  const section = h("section", { class: "run" },
    h("h2", {}, `${label}${run.name}`),
    h("div", { class: "panel" }, kv([
      ["model", cfg.model], ["data", cfg.data], ["repeats (k)", cfg.k], ["turn caps", caps.join(", ")],
      ["options", cfg.options], ["protocol", cfg.protocol && `${cfg.protocol}, ${cfg.coords} coordinates`],
      ["trajectories", run.count], ["started", run.started_at], ["source", run.source]])),
    h("div", { class: "panel" }, h("h3", {}, "Accuracy by turn cap (%)"), summaryTable(run)));
  if (run.sweep) section.append(h("div", { class: "panel" }, h("h3", {}, "Accuracy against turn cap"),
    h("img", { class: "plot", src: run.sweep, alt: "accuracy against turn cap" })));
  if (last) {
    section.append(h("div", { class: "grid" }, bars(`Turns per trajectory (cap ${caps[caps.length - 1]})`,
      last.turns_histogram), bars("Stop reasons", last.stop_reasons), bars("Mistakes by kind", last.errors_by_kind)));
    const f = last.faithfulness;
    section.append(h("div", { class: "panel" }, h("h3", {}, "Faithfulness"), h("p", {},
      f.checked ? `Of ${f.checked} correct answers to questions with known targets, ${pct(f.covered_rate)} % zoomed ` +
        `over every target (a zoom holding at least ${100 * f.threshold} % of it); mean best IoU ${fmt(f.best_iou_mean)}.`
        : "No correct answers to questions with known target boxes.")));
    section.append(h("div", { class: "grid" }, breakdown(last)));
  }
  section.append(h("details", { class: "panel" }, h("summary", {}, "Resolved configuration"),
    h("pre", {}, JSON.stringify(run.config, null, 2))));
  return section;
}

// -------------------------------------------------------------------------------------------------------- list
function distinct(key) {
  return [...new Set(G.index.map((r) => r[key]).filter((v) => v !== null && v !== undefined && v !== ""))].sort();
}

function matches(r) {
  if (state.status === "correct" && r.ok !== true) return false;
  if (state.status === "wrong" && r.ok !== false) return false;
  if (state.status === "unscored" && (r.ok === true || r.ok === false)) return false;
  if (state.overTurn && !r.ot) return false;
  if (state.toolError && !r.te) return false;
  if (state.level && r.level !== state.level) return false;
  if (state.category && r.cat !== state.category) return false;
  if (state.cap && String(r.cap) !== state.cap) return false;
  if (state.compare !== "all") {
    const b = r.b_ok;
    if (state.compare === "a_only" && !(r.ok === true && b !== true)) return false;
    if (state.compare === "b_only" && !(b === true && r.ok !== true)) return false;
    if (state.compare === "differ" && (r.ok === true) === (b === true)) return false;
  }
  if (state.q) {
    const q = state.q.toLowerCase();
    if (![r.id, r.q, r.a, r.g].some((v) => v && String(v).toLowerCase().includes(q))) return false;
  }
  return true;
}

function selected() {
  const rows = G.index.filter(matches);
  const key = state.sort;
  rows.sort((x, y) => {
    const a = x[key], b = y[key];
    return (a < b ? -1 : a > b ? 1 : 0) * state.dir || x.i - y.i;
  });
  return rows;
}

function select(label, key, options) {
  return h("label", {}, `${label} `, h("select", { onchange: (e) => { state[key] = e.target.value; state.page = 0; renderList(); } },
    options.map(([value, text]) => h("option", { value, selected: state[key] === value }, text))));
}

function check(label, key) {
  return h("label", {}, h("input", { type: "checkbox", checked: state[key],
    onchange: (e) => { state[key] = e.target.checked; state.page = 0; renderList(); } }), ` ${label}`);
}

function listSection() {
  const compare = G.runs.length > 1;
  const filters = h("div", { class: "filters", id: "filters" },
    h("input", { type: "search", placeholder: "search question, answer or id", value: state.q, id: "search",
      oninput: (e) => { state.q = e.target.value; state.page = 0; renderList(); } }),
    select("status", "status", [["all", "all"], ["correct", "correct"], ["wrong", "wrong"], ["unscored", "not scored"]]),
    check("over-turn", "overTurn"), check("tool error", "toolError"),
    distinct("level").length ? select("level", "level", [["", "all"], ...distinct("level").map((v) => [v, v])]) : null,
    distinct("cat").length ? select("category", "category", [["", "all"], ...distinct("cat").map((v) => [v, v])]) : null,
    distinct("cap").length > 1 ? select("cap", "cap", [["", "all"], ...distinct("cap").map((v) => [String(v), String(v)])]) : null,
    compare ? select("compare", "compare", [["all", "all"], ["a_only", "A right, B not"], ["b_only", "B right, A not"],
      ["differ", "A and B differ"]]) : null,
    select("sort", "sort", [["i", "file order"], ["nt", "turns"], ["lat", "latency"], ["id", "id"]]),
    h("button", { onclick: () => { state.dir *= -1; renderList(); } }, "↑↓"));
  return h("section", {}, h("h2", {}, "Trajectories"), filters, h("div", { id: "list" }));
}

function renderList() {
  const box = document.getElementById("list");
  if (!box) return;
  const rows = selected();
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  const shown = rows.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE);
  const compare = G.runs.length > 1;
  const pager = h("div", { class: "pager" },
    h("button", { disabled: state.page === 0, onclick: () => { state.page--; renderList(); } }, "‹ previous"),
    h("span", { id: "count" }, `${rows.length} of ${G.index.length} trajectories · page ${state.page + 1} of ${pages}`),
    h("button", { disabled: state.page >= pages - 1, onclick: () => { state.page++; renderList(); } }, "next ›"));
  const head = ["", "id", "level", "category", compare ? "A" : "result", compare ? "B" : null, "turns", "seconds",
    "answer", "gold", "question"].filter((c) => c !== null);
  const table = h("table", { id: "rows" },
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { class: ["turns", "seconds"].includes(c) ? "num" : "" }, c)))),
    h("tbody", {}, shown.map((r) => h("tr", { class: "row", "data-i": r.i, onclick: () => { location.hash = `#/t/${r.i}`; } },
      h("td", {}, r.thumb ? h("img", { class: "thumb", src: r.thumb, loading: "lazy", alt: "" }) : ""),
      h("td", {}, r.id), h("td", {}, r.level || ""), h("td", {}, r.cat || ""),
      h("td", {}, badge(r.ok, r.m), r.ot ? h("span", { class: "badge warn" }, "over-turn") : null),
      compare ? h("td", {}, r.b === null ? h("span", { class: "muted" }, "–") : badge(r.b_ok)) : null,
      h("td", { class: "num" }, r.nt), h("td", { class: "num" }, fmt(r.lat, 1)),
      h("td", {}, r.a === null ? h("span", { class: "muted" }, r.stop) : r.a), h("td", {}, r.g ?? ""),
      h("td", { class: "muted" }, r.q)))));
  box.replaceChildren(pager, table);
}

function renderOverview(app) {
  document.getElementById("run-title").textContent = G.runs.map((r) => r.name).join("  vs  ");
  app.replaceChildren(...G.runs.map((run, i) => runSection(run, G.runs.length > 1 ? `${"AB"[i]}: ` : "")),
    listSection());
  renderList();
}

// ------------------------------------------------------------------------------------------------- trajectory
function originals(t) {
  /* Every original image: image_1 (t.image, shown at t.shown_size), then image_2 … (t.more_images). */
  if (!t.image) return [];
  return [{ ...t.image, shown_size: t.shown_size }, ...(t.more_images || [])];
}

function originalName(t, k) {
  return (t.more_images || []).length ? `image_${k + 1}` : "original";
}

function pick(imgs, k) {
  /* The loaded image of original k, from one image (a single original) or a list. */
  return Array.isArray(imgs) ? imgs[k] || null : k === 0 ? imgs : null;
}

function regions(t) {
  /* Region (pixels of its original), source and original of every image, by observation index; index 0 is
     image_1, and `originals` holds every original. */
  const origs = originals(t).map((o, k) => ({ box: [0, 0, o.width, o.height], source: null, shown: o.shown_size,
    original: k }));
  const out = { 0: origs[0], originals: origs };
  for (const turn of t.turns) {
    if (turn.observation_index !== null && turn.crop_box_px) {
      out[turn.observation_index] = { box: turn.crop_box_px, source: turn.source_index, shown: turn.observation_size,
        original: turn.original_index || 0 };
    }
  }
  return out;
}

function sourceRegion(regs, turn) {
  return turn.source_index === 0 ? regs.originals[turn.original_index || 0] : regs[turn.source_index];
}

function chain(t, regs, index) {
  const names = [];
  const original = originalName(t, regs[index].original);
  for (let i = index; i !== null && i !== undefined; i = regs[i] ? regs[i].source : null) {
    names.unshift(i === 0 ? original : `observation ${i}`);
    if (i === 0) break;
  }
  return names.join(" → ");
}

function requestedBox(t, turn, regs) {
  /* Where a call pointed, in original pixels, for calls that were never run (a cap ended the loop first). */
  if (!turn.call || turn.source_index === null || turn.source_index === undefined) return null;
  const src = sourceRegion(regs, turn);
  if (!src) return null;
  const [x0, y0, x1, y1] = turn.call.bbox_2d;
  const coords = t.settings.coords;
  const sx = coords === "relative" ? 1 : coords === "thousand" ? 1000 : src.shown[0];
  const sy = coords === "relative" ? 1 : coords === "thousand" ? 1000 : src.shown[1];
  const [bx0, by0, bx1, by1] = src.box;
  const w = bx1 - bx0, h = by1 - by0;
  return [bx0 + (x0 / sx) * w, by0 + (y0 / sy) * h, bx0 + (x1 / sx) * w, by0 + (y1 / sy) * h];
}

function drawRegion(img, ref, region, marks, maxWidth = 460) {
  /* A canvas showing `region` (pixels of the original `ref`, loaded as `img`), with boxes drawn on it. */
  const [x0, y0, x1, y1] = region;
  const w = x1 - x0, hgt = y1 - y0;
  const scale = Math.min(1, maxWidth / w) * (w < 200 ? Math.min(4, 200 / w) : 1);
  const canvas = h("canvas", { class: "view", width: Math.max(1, Math.round(w * scale)),
    height: Math.max(1, Math.round(hgt * scale)) });
  const ctx = canvas.getContext("2d");
  const fx = img.naturalWidth / ref.width, fy = img.naturalHeight / ref.height;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(img, x0 * fx, y0 * fy, w * fx, hgt * fy, 0, 0, canvas.width, canvas.height);
  for (const m of marks) {
    const [a, b, c, d] = m.box;
    ctx.strokeStyle = m.color;
    ctx.lineWidth = 2.5;
    ctx.setLineDash(m.dashed ? [6, 4] : []);
    ctx.strokeRect((a - x0) * scale, (b - y0) * scale, (c - a) * scale, (d - b) * scale);
  }
  return canvas;
}

function targets(t, k) {
  /* The gold boxes in original k (meta.target_images says which image each box is in; else image_1). */
  const where = (t.sample.meta || {}).target_images;
  return (t.sample.target_boxes || []).filter((_, i) => (where ? where[i] : 0) === k);
}

function goldMarks(t, k) {
  return targets(t, k).map((b) => ({ box: b, color: COLORS.gold, dashed: true }));
}

function originalPanel(t, src, k = 0) {
  /* Original k with the gold boxes and the zooms cut from it. */
  const ref = originals(t)[k];
  const W = ref.width, H = ref.height;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  const stroke = Math.max(2, W / 400);
  for (const b of targets(t, k)) {
    svg.append(s("rect", { x: b[0], y: b[1], width: b[2] - b[0], height: b[3] - b[1], fill: "none", stroke: COLORS.gold,
      "stroke-width": stroke, "stroke-dasharray": `${stroke * 3} ${stroke * 2}`, class: "gold-box" }));
  }
  for (const turn of t.turns) {
    if (!turn.crop_box_px || (turn.original_index || 0) !== k) continue;
    const [a, b, c, d] = turn.crop_box_px;
    svg.append(s("rect", { x: a, y: b, width: c - a, height: d - b, fill: "none", stroke: COLORS.zoom,
      "stroke-width": stroke, class: "zoom-box" }));
    const label = s("text", { x: a + stroke, y: b + stroke * 8, fill: COLORS.zoom, "font-size": stroke * 8,
      "font-weight": "700" });
    label.textContent = String(turn.observation_index);
    svg.append(label);
  }
  const title = (t.more_images || []).length ? `image_${k + 1} ` : "Original image ";
  return h("div", { class: "panel original-panel", "data-original": k },
    h("h3", {}, title, h("span", { class: "muted" }, `${W}×${H}, shown to the model at `
      + `${ref.shown_size[0]}×${ref.shown_size[1]} · `), h("a", { href: src, target: "_blank" }, "full resolution")),
    h("div", { class: "legend" }, h("span", {}, h("span", { class: "swatch", style: `background:${COLORS.zoom}` }), "zooms"),
      h("span", {}, h("span", { class: "swatch", style: `background:${COLORS.gold}` }), "gold target")),
    h("div", { class: "original-wrap" }, h("img", { src, alt: "original", class: "original" }), svg));
}

function turnCard(t, turn, imgs, regs) {
  /* One turn; `imgs` is the loaded original, or a list with each original loaded (null where missing). */
  const kind = turn.kind;
  const card = h("div", { class: `panel turn ${kind}`, "data-turn": turn.index },
    h("div", { class: "head" }, h("strong", {}, `Turn ${turn.index + 1}`), h("span", { class: "badge none" }, kind),
      turn.error_kind ? h("span", { class: "badge bad" }, turn.error_kind) : null,
      h("span", { class: "muted" }, `${fmt(turn.latency_s)} s model · ${fmt(turn.tool_s, 3)} s tool · `
        + `${turn.usage.prompt_tokens} prompt + ${turn.usage.completion_tokens} generated tokens`)));
  if (turn.thought) card.append(h("div", { class: "thought" }, turn.thought));
  if (kind === "code") {
    card.append(h("pre", { class: "code" }, turn.code), h("div", { class: "muted" }, "What the model was told:"),
      h("pre", { class: "code-output" }, turn.code_output));
    const made = (t.view && t.view.made) || {};
    if (turn.made.length) card.append(h("div", { class: "figures" }, turn.made.map((m) => h("figure", {},
      made[m.observation_index] ? h("img", { class: "made", src: made[m.observation_index], alt: "image made by code" })
        : h("div", { class: "missing" }, "image not in this report"),
      h("figcaption", {}, `observation ${m.observation_index}, made by the code: ${m.width}×${m.height} px`)))));
  }
  if (turn.error) card.append(h("div", { class: "error-text" }, `Shown to the model: ${turn.error}`));
  if (kind === "answer") card.append(h("p", {}, h("strong", {}, "Answer: "), turn.answer));
  const k = turn.original_index || 0;
  const img = pick(imgs, k), ref = originals(t)[k];
  const src = turn.source_index !== null && turn.source_index !== undefined ? sourceRegion(regs, turn) : null;
  if (img && ref && src) {
    const figures = h("div", { class: "figures" });
    const box = turn.crop_box_px || requestedBox(t, turn, regs);
    const name = turn.source_index === 0 ? originalName(t, k) : `observation ${turn.source_index}`;
    if (box) {
      const pending = !turn.crop_box_px;
      figures.append(h("figure", {}, drawRegion(img, ref, src.box, [...goldMarks(t, k), { box, color: pending ? COLORS.pending : COLORS.zoom }]),
        h("figcaption", {}, `${name} with the box asked for`
          + (kind === "error" ? ` (refused: ${turn.error_kind})` : pending ? " (never run: a cap ended the loop first)" : ""))));
    }
    if (turn.crop_box_px) {
      const [a, b, c, d] = turn.crop_box_px;
      const of = (t.more_images || []).length ? `image_${k + 1}` : "the original";
      figures.append(h("figure", { class: "crop" }, drawRegion(img, ref, turn.crop_box_px, goldMarks(t, k)),
        h("figcaption", {}, `observation ${turn.observation_index}: pixels (${a}, ${b})–(${c}, ${d}) of ${of}, `
          + `${c - a}×${d - b} px, shown at ${turn.observation_size[0]}×${turn.observation_size[1]}`)));
      card.append(h("div", { class: "chain" }, chain(t, regs, turn.observation_index)));
    }
    card.append(figures);
  }
  card.append(h("details", { class: "raw" }, h("summary", { class: "muted" }, "raw reply"), h("pre", {}, turn.text)));
  return card;
}

async function trajectoryColumn(n, label) {
  const t = await loadTrajectory(n);
  const col = h("div", { class: "column" });
  const sc = t.score || {};
  col.append(h("div", { class: "panel" },
    h("h3", {}, label, t.id, " ", badge(sc.correct ?? null, sc.method), t.over_turn ? h("span", { class: "badge warn" }, "over-turn") : null),
    kv([["model", t.settings.model], ["answer", t.answer], ["gold", t.sample.answer], ["scored by", sc.method],
      ["stop", t.stop_reason], ["turns", t.turns.length], ["tokens", `${t.usage.prompt_tokens} prompt + ${t.usage.completion_tokens} generated`],
      ["seconds", fmt(t.wall_s)], ["error", t.error]])));
  if (!t.image) {
    col.append(h("div", { class: "missing" }, t.error || "No image."));
    return col;
  }
  const refs = originals(t);
  const srcs = (t.view && (t.view.srcs || [t.view.src])) || [];
  const imgs = await Promise.all(refs.map((_, k) => (srcs[k] ? loadImage(srcs[k]).catch(() => null) : null)));
  refs.forEach((ref, k) => col.append(imgs[k] ? originalPanel(t, srcs[k], k)
    : h("div", { class: "missing" }, `The original image is not in this report (${ref.path}).`)));
  const regs = regions(t);
  for (const turn of t.turns) col.append(turnCard(t, turn, imgs, regs));
  return col;
}

async function renderTrajectory(app, n) {
  const row = G.index[n];
  if (!row) {
    app.replaceChildren(h("p", {}, `There is no trajectory ${n}. `, h("a", { href: "#/" }, "Back to the list")));
    return;
  }
  const i = G.index.indexOf(row);
  const nav = h("div", { class: "pager" }, h("a", { href: "#/" }, "← list"),
    i > 0 ? h("a", { href: `#/t/${G.index[i - 1].i}` }, "‹ previous") : null,
    i < G.index.length - 1 ? h("a", { href: `#/t/${G.index[i + 1].i}` }, "next ›") : null);
  app.replaceChildren(nav, h("p", { class: "muted" }, "Loading…"));
  const first = await loadTrajectory(n);
  const head = h("div", { class: "panel" }, h("h2", {}, "Question"), h("div", { class: "question" }, first.sample.question));
  const columns = [trajectoryColumn(n, G.runs.length > 1 ? "A: " : "")];
  if (row.b !== null && row.b !== undefined) columns.push(trajectoryColumn(row.b, "B: "));
  app.replaceChildren(nav, head, h("div", { class: "columns" }, await Promise.all(columns)));
}

// ------------------------------------------------------------------------------------------------------ routing
function route() {
  const app = document.getElementById("app");
  const m = location.hash.match(/^#\/t\/(\d+)/);
  window.scrollTo(0, 0);
  if (m) renderTrajectory(app, Number(m[1])).catch((e) => app.replaceChildren(h("p", { class: "error-text" }, String(e))));
  else renderOverview(app);
}
// The live page of `glimpse ui` sets GLIMPSE.embedded and draws its turns with these same functions.
G.view = { h, badge, kv, fmt, regions, originalPanel, turnCard, loadImage };
if (!G.embedded) {
  window.addEventListener("hashchange", route);
  route();
}

/* saeclt feature dashboard. Static and offline: the data arrive as scripts calling SAE.load(kind, n, payload)
   (data/index.js with the page, data/chunk_NNN.js and data/inst_NNN.js when a feature is opened).
   State lives in the URL: ?band=in&sort=score&dir=desc&q=...&fmin=&fmax=&smin=&feature=12, in the query or the
   hash (#feature=12); a key in the hash wins over the same key in the query. Corpus text is only ever inserted with textContent. */
(function () {
  "use strict";

  var root = document.documentElement;
  var errors = [];
  function recordError(message) {
    errors.push(String(message));
    root.setAttribute("data-errors", errors.join(" | "));
  }
  window.addEventListener("error", function (e) {
    if (e.target && e.target.getAttribute && e.target.getAttribute("data-loader")) return; // reported by need()
    recordError(e.message || ("could not load " + ((e.target && (e.target.src || e.target.href)) || "a resource")));
  }, true);

  var STORE = { index: null, chunk: {}, inst: {} };
  var pending = {};
  var SAE = window.SAE = {
    load: function (kind, n, payload) {
      if (kind === "index") STORE.index = payload; else STORE[kind][n] = payload;
    }
  };

  function pad3(n) { return ("00" + n).slice(-Math.max(3, String(n).length)); }

  /* Load data/<kind>_NNN.js once (a script tag: file:// forbids fetch), then call done. */
  function need(kind, n, done) {
    if (STORE[kind][n] !== undefined) { done(); return; }
    var key = kind + ":" + n;
    if (pending[key]) { pending[key].push(done); return; }
    pending[key] = [done];
    var path = "data/" + kind + "_" + pad3(n) + ".js";
    var s = document.createElement("script");
    s.src = path;
    s.charset = "utf-8";
    s.setAttribute("data-loader", "1");
    s.onload = function () {
      var callbacks = pending[key]; delete pending[key];
      if (STORE[kind][n] === undefined) { recordError(path + " did not provide its data"); return; }
      callbacks.forEach(function (f) { f(); });
    };
    s.onerror = function () {
      delete pending[key];
      recordError("could not load " + path + " (the dashboard's files are incomplete: rebuild it with the report stage)");
    };
    document.head.appendChild(s);
  }
  function needAll(kind, numbers, done) {
    var left = numbers.length;
    if (!left) { done(); return; }
    numbers.forEach(function (n) { need(kind, n, function () { if (--left === 0) done(); }); });
  }

  /* ---------- small DOM helpers ---------- */
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  var SVGNS = (function () { // the SVG namespace, read from a parsed (constant) element
    var d = document.createElement("div");
    d.innerHTML = "<svg></svg>";
    return d.firstChild.namespaceURI;
  })();
  function svgEl(tag, attrs, children) {
    var node = document.createElementNS(SVGNS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  function setAttrs(node, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (k) {
      if (attrs[k] === null || attrs[k] === undefined) return;
      if (k === "text") node.textContent = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
  }
  function append(node, children) {
    if (children === undefined || children === null) return;
    if (!Array.isArray(children)) children = [children];
    children.forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    });
  }
  function svgTitle(text) { return svgEl("title", { text: text }); }

  function num(v, digits) {
    if (v === null || v === undefined || typeof v !== "number" || !isFinite(v)) return "–";
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential((digits || 3) - 1);
    return String(Number(v.toPrecision(digits || 3)));
  }
  function pct(v) { return v === null || v === undefined ? "–" : num(100 * v, 3) + " %"; }
  var BAND_NAMES = ["below", "in", "above"];

  /* ---------- URL state ---------- */
  var KEYS = ["band", "sort", "dir", "q", "fmin", "fmax", "smin", "feature"];
  var DEFAULTS = { band: "all", sort: "score", dir: "desc", q: "", fmin: "", fmax: "", smin: "", feature: "" };
  var state = {};

  function parseParams(text) {
    var out = {};
    text.replace(/^[?#]/, "").split("&").forEach(function (part) {
      if (!part) return;
      var i = part.indexOf("=");
      var k = decodeURIComponent(i < 0 ? part : part.slice(0, i));
      var v = i < 0 ? "" : decodeURIComponent(part.slice(i + 1).replace(/\+/g, " "));
      if (KEYS.indexOf(k) >= 0) out[k] = v;
    });
    return out;
  }
  var fromQuery = parseParams(location.search);  // the page's query: the base the hash overrides key by key
  function readState() {
    var fromHash = parseParams(location.hash);
    state = {};
    KEYS.forEach(function (k) {
      state[k] = fromHash[k] !== undefined ? fromHash[k] : fromQuery[k] !== undefined ? fromQuery[k] : DEFAULTS[k];
    });
    if (["all", "in", "below", "above"].indexOf(state.band) < 0) state.band = "all";
    if (state.dir !== "asc" && state.dir !== "desc") state.dir = DEFAULTS.dir;
    if (/^\d+$/.test(state.feature)) state.feature = String(parseInt(state.feature, 10));
  }
  function hashFor(changes) {
    var s = {};
    KEYS.forEach(function (k) { s[k] = changes && k in changes ? changes[k] : state[k]; });
    var parts = [];
    KEYS.forEach(function (k) {
      if (String(s[k]) !== String(DEFAULTS[k]) || k in fromQuery) parts.push(k + "=" + encodeURIComponent(String(s[k])));
    });
    return "#" + (parts.length ? parts.join("&") : "sort=" + DEFAULTS.sort);
  }
  function navigate(changes, replace) {
    var h = hashFor(changes);
    if (h === location.hash) return;
    if (replace) location.replace(h); else location.hash = h;
  }

  /* ---------- the table of all latents ---------- */
  var IDX, N, rows = [], order = [], textLower = [], columns = [];
  var lastSort = null;

  function makeColumns() {
    var cols = [
      { key: "id", label: "feature", value: function (i) { return i; }, show: String, dir: "asc" },
      { key: "score", label: "score", value: function (i) { return IDX.score[i]; }, show: num,
        about: "magnitude × √frequency" },
      { key: "freq", label: "frequency", value: function (i) { return IDX.frequency[i]; }, show: pct,
        about: "fraction of analysed rows where it fires" },
      { key: "mag", label: "magnitude", value: function (i) { return IDX.magnitude[i]; }, show: num,
        about: "mean activation where it fires" },
      { key: "max", label: "max", value: function (i) { return IDX.max[i]; }, show: num },
      { key: "band", label: "band", value: function (i) { return IDX.band_of[i]; },
        show: function (b) { return BAND_NAMES[b]; }, about: "position relative to the frequency band" }
    ];
    if (IDX.effect_name) {
      cols.push({ key: "effect", label: "ablation: " + IDX.effect_name, value: function (i) { return IDX.effect[i]; },
        show: num, about: "effect on the subject's task of zeroing this latent" });
    }
    return cols;
  }

  function buildTable() {
    var head = document.getElementById("latents-head");
    columns.forEach(function (c) {
      var th = el("th", { "data-key": c.key, title: c.about || null, scope: "col" }, [c.label, el("span", { class: "arrow" })]);
      if (c.key !== "id" && c.key !== "band") th.className = "num";
      th.addEventListener("click", function () {
        var dir = state.sort === c.key ? (state.dir === "desc" ? "asc" : "desc") : (c.dir || "desc");
        navigate({ sort: c.key, dir: dir }, true);
      });
      head.appendChild(th);
    });
    var body = document.getElementById("latents-body");
    for (var i = 0; i < N; i++) {  // built once, inserted in sorted order by applyTable; filters toggle `hidden`
      var tr = document.createElement("tr");
      tr.setAttribute("data-f", i);
      for (var c = 0; c < columns.length; c++) {
        var col = columns[c], td = document.createElement("td");
        if (col.key === "id") td.appendChild(el("a", { href: "#feature=" + i, text: String(i) }));
        else td.textContent = col.show(col.value(i));
        if (col.key === "band") td.className = "band-" + BAND_NAMES[IDX.band_of[i]];
        else if (col.key !== "id") td.className = "num";
        tr.appendChild(td);
      }
      rows.push(tr);
    }
    body.addEventListener("click", function (e) {
      var tr = e.target.closest("tr");
      if (!tr || e.ctrlKey || e.metaKey || e.button !== 0) return;
      e.preventDefault();
      navigate({ feature: tr.getAttribute("data-f") }, false);
    });
  }

  function passes(i, f) {
    if (f.band >= 0 && IDX.band_of[i] !== f.band) return false;
    var freq = IDX.frequency[i];
    if (f.fmin !== null && !(freq >= f.fmin)) return false;
    if (f.fmax !== null && !(freq <= f.fmax)) return false;
    if (f.smin !== null && !(IDX.score[i] >= f.smin)) return false;
    if (f.q) {
      if (f.qId === i) return true;
      return textLower[i].indexOf(f.q) >= 0;
    }
    return true;
  }
  function parseNum(s) { var v = parseFloat(s); return s === "" || isNaN(v) ? null : v; }

  function applyTable() {
    var q = state.q.trim().toLowerCase();
    var filter = {
      band: { all: -1, below: 0, "in": 1, above: 2 }[state.band], q: q, qId: /^\d+$/.test(q) ? parseInt(q, 10) : -1,
      fmin: parseNum(state.fmin), fmax: parseNum(state.fmax), smin: parseNum(state.smin)
    };
    var col = columns.filter(function (c) { return c.key === state.sort; })[0] || columns[1];
    var sign = state.dir === "asc" ? 1 : -1;
    var sortKey = col.key + ":" + state.dir;
    if (sortKey !== lastSort) {
      order = [];
      for (var i = 0; i < N; i++) order.push(i);
      order.sort(function (a, b) {
        var va = col.value(a), vb = col.value(b);
        if (va === null || va === undefined) return vb === null || vb === undefined ? a - b : 1;
        if (vb === null || vb === undefined) return -1;
        return va === vb ? a - b : (va < vb ? -sign : sign);
      });
      var frag = document.createDocumentFragment();
      order.forEach(function (j) { frag.appendChild(rows[j]); });
      document.getElementById("latents-body").appendChild(frag);
      lastSort = sortKey;
    }
    var shown = 0;
    for (var k = 0; k < N; k++) {
      var ok = passes(order[k], filter);
      if (rows[order[k]].hidden === ok) rows[order[k]].hidden = !ok;
      if (ok) shown++;
    }
    document.getElementById("count").textContent = "showing " + shown + " of " + N + " latents";
    Array.prototype.forEach.call(document.querySelectorAll("#latents-head th"), function (th) {
      var active = th.getAttribute("data-key") === col.key;
      th.setAttribute("aria-sort", active ? (state.dir === "asc" ? "ascending" : "descending") : "none");
      th.querySelector(".arrow").textContent = active ? (state.dir === "asc" ? " ▲" : " ▼") : "";
    });
    syncFilters();
  }

  function visibleOrder() {
    return order.filter(function (i) { return !rows[i].hidden; });
  }

  /* ---------- filter controls ---------- */
  function buildFilters() {
    var counts = [0, 0, 0];
    IDX.band_of.forEach(function (b) { counts[b]++; });
    var group = document.getElementById("f-band");
    [["all", "all", N], ["in", "in band", counts[1]], ["below", "below", counts[0]], ["above", "above", counts[2]]]
      .forEach(function (b) {
        var btn = el("button", { type: "button", "data-band": b[0] }, [b[1] + " ", el("span", { class: "muted", text: String(b[2]) })]);
        btn.addEventListener("click", function () { navigate({ band: b[0] }, true); });
        group.appendChild(btn);
      });
    var timer = null;
    document.getElementById("f-q").addEventListener("input", function (e) {
      var v = e.target.value;
      clearTimeout(timer);
      timer = setTimeout(function () { navigate({ q: v }, true); }, 120);
    });
    ["fmin", "fmax", "smin"].forEach(function (k) {
      document.getElementById("f-" + k).addEventListener("change", function (e) {
        var o = {}, v = e.target.value;
        o[k] = k === "smin" || v === "" || isNaN(parseFloat(v)) ? v : String(Number((parseFloat(v) / 100).toPrecision(6)));
        navigate(o, true);
      });
    });
    document.getElementById("f-reset").addEventListener("click", function () {
      navigate({ band: "all", q: "", fmin: "", fmax: "", smin: "" }, true);
    });
  }
  function syncFilters() {
    ["q", "fmin", "fmax", "smin"].forEach(function (k) {  // frequencies are fractions in the URL, percent in the inputs
      var input = document.getElementById("f-" + k), v = state[k];
      if ((k === "fmin" || k === "fmax") && v !== "" && !isNaN(parseFloat(v))) v = String(Number((100 * parseFloat(v)).toPrecision(6)));
      if (document.activeElement !== input && input.value !== v) input.value = v;
    });
    Array.prototype.forEach.call(document.querySelectorAll("#f-band button"), function (b) {
      b.setAttribute("aria-pressed", b.getAttribute("data-band") === state.band ? "true" : "false");
    });
  }

  /* ---------- generic effects (ablations and interventions) ---------- */
  function effectsTable(effects) {
    var table = el("table", { class: "kv" });
    Object.keys(effects || {}).forEach(function (k) {
      table.appendChild(el("tr", null, [el("th", { text: k }), el("td", null, effectValue(effects[k]))]));
    });
    return table;
  }
  function effectValue(v) {
    if (typeof v === "number") return el("span", { class: "num", text: num(v, 4) });
    if (Array.isArray(v)) {
      return el("ol", { class: "small-list" }, v.slice(0, 20).map(function (item) {
        var text = Array.isArray(item) ? item.map(function (x) { return typeof x === "number" ? num(x, 3) : String(x); }).join(": ")
          : (typeof item === "number" ? num(item, 4) : String(item));
        return el("li", { text: text });
      }));
    }
    if (v && typeof v === "object") return effectsTable(v);
    return el("span", { text: v === null || v === undefined ? "n/a" : String(v) });
  }
  function featureLink(f, label) {
    return el("a", { href: hashFor({ feature: String(f) }), text: label === undefined ? String(f) : label });
  }
  function editText(edit) {
    var s = edit.op + (edit.value !== undefined && edit.value !== null ? " " + edit.value : "");
    if (edit.low !== undefined && edit.low !== null) s += " (low " + edit.low + ")";
    return s;
  }
  function interventionBlock(iv) {
    var edits = (iv.edits || []).map(function (e) {
      return el("li", null, ["feature ", featureLink(e.feature), ": " + editText(e)]);
    });
    return el("div", { class: "card" }, [
      el("h3", { text: "Intervention " + iv.name }),
      el("p", { class: "muted", text: "mode " + iv.mode + (iv.keep_error === false ? ", error term dropped" : ", error term kept") }),
      edits.length ? el("ul", { class: "small-list" }, edits) : null,
      effectsTable(iv.effects)
    ]);
  }
  function renderInterventions() {
    var box = document.getElementById("interventions");
    if (!IDX.interventions.length) return;
    append(box, [el("h2", { text: "Interventions" }),
      el("p", { class: "muted", text: "The spec's edits, run in the subject's task (metrics/" + IDX.experiment + "/analysis.json)." }),
      el("div", { class: "grid" }, IDX.interventions.map(interventionBlock))]);
  }

  /* ---------- a feature's page ---------- */
  var view = null;

  function showFeature(f) {
    var box = document.getElementById("feature-view");
    document.getElementById("table-view").hidden = true;
    box.hidden = false;
    root.setAttribute("data-view", "feature");
    root.removeAttribute("data-ready");
    box.textContent = "";
    if (!/^\d+$/.test(state.feature) || f >= N) {
      append(box, [nav(f), el("p", { class: "error", text: "There is no feature " + state.feature + " (features 0 to " + (N - 1) + ")." })]);
      root.setAttribute("data-ready", "1");
      return;
    }
    box.appendChild(el("p", { class: "muted", text: "loading feature " + f + " …" }));
    var c = Math.floor(f / IDX.chunk);
    need("chunk", c, function () {
      var feat = STORE.chunk[c][f - c * IDX.chunk];
      var buckets = [];
      feat.ex.forEach(function (e) { var b = Math.floor(e[2] / IDX.bucket); if (buckets.indexOf(b) < 0) buckets.push(b); });
      needAll("inst", buckets, function () {
        if (String(f) !== state.feature) return;
        box.textContent = "";
        renderFeature(box, f, feat);
        root.setAttribute("data-ready", "1");
      });
    });
  }

  function nav(f) {
    var seq = visibleOrder(), at = seq.indexOf(f);
    var prev = at > 0 ? seq[at - 1] : (at < 0 && f > 0 ? f - 1 : null);
    var next = at >= 0 && at + 1 < seq.length ? seq[at + 1] : (at < 0 && f + 1 < N ? f + 1 : null);
    view = { prev: prev, next: next };
    return el("nav", { class: "feature-nav" }, [
      el("a", { href: hashFor({ feature: "" }), text: "← all latents" }),
      prev !== null ? featureLink(prev, "‹ previous (" + prev + ")") : null,
      next !== null ? featureLink(next, "next (" + next + ") ›") : null,
      el("span", { class: "muted", text: "keys: ← → previous / next, Esc the table" })
    ]);
  }

  function statChips(f) {
    var chips = [["score", num(IDX.score[f], 4)], ["frequency", pct(IDX.frequency[f])], ["magnitude", num(IDX.magnitude[f], 4)],
      ["max", num(IDX.max[f], 4)], ["band", BAND_NAMES[IDX.band_of[f]]]];
    if (IDX.effect_name && IDX.effect[f] !== null) chips.push(["ablation " + IDX.effect_name, num(IDX.effect[f], 4)]);
    return el("div", { class: "chips" }, chips.map(function (c) {
      return el("span", { class: "chip" }, [el("span", { class: "muted", text: c[0] + " " }), el("b", { text: c[1] })]);
    }));
  }

  function renderFeature(box, f, feat) {
    append(box, [nav(f), el("h2", { text: "Feature " + f }), statChips(f)]);
    var cards = [card("Activation histogram", histogram(feat.hist, IDX.max[f]))];
    if (feat.logit) cards.push(card("Output tokens (decoder · unembedding)", logitTable(feat.logit)));
    if (feat.dec.length) cards.push(card("Decoder: largest target dims", decoderTable(feat.dec)));
    if (feat.nb.length) cards.push(card("Neighbours by decoder cosine", pairList(feat.nb, "cosine")));
    if (feat.co && feat.co.length) cards.push(card("Co-firing partners", cofireTable(feat.co)));
    if (feat.ablation) cards.push(card("Ablation effect (latent set to 0)", effectsTable(feat.ablation)));
    var ivs = IDX.interventions.filter(function (iv) {
      return (iv.edits || []).some(function (e) { return e.feature === f; });
    });
    ivs.forEach(function (iv) { cards.push(interventionBlock(iv)); });
    box.appendChild(el("div", { class: "grid" }, cards));
    var top = feat.ex.filter(function (e) { return e[0] < 0; });
    var quant = feat.ex.filter(function (e) { return e[0] >= 0; }).sort(function (a, b) { return b[0] - a[0] || b[4] - a[4]; });
    box.appendChild(el("h3", { text: "Top activations (" + top.length + ")" }));
    box.appendChild(el("p", { class: "muted legend", text: LEGEND[IDX.kind] || "" }));
    box.appendChild(examplesList(top, f));
    if (quant.length) {
      box.appendChild(el("h3", { text: "Samples across the activation quantiles (highest band first)" }));
      box.appendChild(examplesList(quant, f));
    }
    if (!feat.ex.length) box.appendChild(el("p", { class: "muted", text: "This latent never fires on the analysed rows." }));
  }

  var LEGEND = {
    text: "Each token of the window shaded by this feature's activation on it (white 0, deep orange its max); the example's own token is outlined.",
    tsp: "Each instance: the policy's tour (grey), every city filled by this feature's activation on it (white 0, deep orange its max), the city whose row fired ringed in blue.",
    tensor: "The example's input: its index, shape and first values (orange positive, blue negative)."
  };
  function card(title, body) { return el("div", { class: "card" }, [el("h3", { text: title }), body]); }

  function histogram(counts, max) {
    var W = 340, H = 120, L = 36, B = 20, T = 6;
    var peak = Math.max.apply(null, counts.concat([1]));
    var bw = (W - L - 4) / counts.length;
    var svg = svgEl("svg", { viewBox: "0 0 " + W + " " + H, class: "hist", role: "img" });
    counts.forEach(function (c, i) {
      var h = (H - B - T) * c / peak;
      var lo = max * i / counts.length, hi = max * (i + 1) / counts.length;
      svg.appendChild(svgEl("rect", { x: L + i * bw, y: H - B - h, width: Math.max(bw - 1, 0.5), height: h, class: "bar" },
        svgTitle(num(lo) + " – " + num(hi) + ": " + c + " rows")));
    });
    svg.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - 4, y2: H - B, class: "axis" }));
    svg.appendChild(svgEl("text", { x: L, y: H - 6, class: "tick", text: "0" }));
    svg.appendChild(svgEl("text", { x: W - 4, y: H - 6, class: "tick end", text: num(max) }));
    svg.appendChild(svgEl("text", { x: L - 4, y: T + 8, class: "tick end", text: String(peak) }));
    svg.appendChild(svgEl("text", { x: (L + W) / 2, y: H - 6, class: "tick middle", text: "activation" }));
    var total = counts.reduce(function (a, b) { return a + b; }, 0);
    return el("div", null, [svg, el("p", { class: "muted", text: total + " firing rows in " + counts.length + " bins of equal width" })]);
  }

  function decoderTable(dec) {
    var peak = Math.max.apply(null, dec.map(function (d) { return Math.abs(d[1]); }).concat([1e-12]));
    return el("table", { class: "kv" }, dec.map(function (d) {
      var w = Math.round(60 * Math.abs(d[1]) / peak);
      return el("tr", null, [el("th", { text: "dim " + d[0] }), el("td", { class: "num", text: num(d[1], 3) }),
        el("td", null, el("span", { class: "bar-inline " + (d[1] < 0 ? "neg" : "pos"), style: "width:" + w + "px" }))]);
    }));
  }
  function pairList(pairs, label) {
    return el("ul", { class: "small-list" }, pairs.map(function (p) {
      return el("li", null, [featureLink(p[0], "feature " + p[0]), el("span", { class: "muted", text: " " + label + " " + num(p[1], 3) })]);
    }));
  }
  function cofireTable(co) {
    return el("table", { class: "kv" }, [el("tr", null, [el("th", { text: "partner" }), el("th", { text: "rows both fire" }),
      el("th", { text: "of its firing rows" })])].concat(co.map(function (p) {
      return el("tr", null, [el("td", null, featureLink(p[0])), el("td", { class: "num", text: String(p[1]) }),
        el("td", { class: "num", text: pct(p[2]) })]);
    })));
  }
  function logitTable(logit) {
    function column(title, list) {
      return el("div", null, [el("h4", { text: title }), el("ol", { class: "small-list tokens-list" }, list.map(function (t) {
        return el("li", null, [el("span", { class: "tok-chip", text: visibleToken(t[0]) }), el("span", { class: "muted", text: " " + num(t[1], 3) })]);
      }))]);
    }
    return el("div", { class: "two-col" }, [column("promotes", logit.promoted || []), column("suppresses", logit.suppressed || [])]);
  }

  /* ---------- examples, drawn per subject kind ---------- */
  function activationMap(e, peak) {
    var acts = {};
    for (var i = 0; i + 1 < e[5].length; i += 2) acts[e[3] + e[5][i]] = e[5][i + 1] * peak / 1000;
    acts[e[3]] = e[4];
    return acts;
  }
  function instanceOf(e) {
    var b = Math.floor(e[2] / IDX.bucket);
    return STORE.inst[b][e[2] - b * IDX.bucket];
  }
  function shade(frac) {
    if (!(frac > 0)) return null;
    return "hsl(28, 100%, " + (96 - 46 * Math.min(frac, 1)).toFixed(1) + "%)";
  }
  function examplesList(list, f) {
    var peak = IDX.max[f] || 1;
    return el("div", { class: "examples" }, list.map(function (e) {
      var inst = instanceOf(e), acts = activationMap(e, peak);
      var drawn = IDX.kind === "text" ? textExample(inst[1], e, acts, peak)
        : IDX.kind === "tsp" ? tspExample(inst[1], e, acts, peak) : tensorExample(inst[1], e);
      var label = e[0] < 0 ? "top" : "band " + e[0];
      var where = (IDX.kind === "tsp" ? "city " : IDX.kind === "text" ? "token " : "position ") + e[3];
      return el("div", { class: "example kind-" + IDX.kind, "data-row": e[1] }, [
        el("div", { class: "caption muted" }, [el("b", { text: num(e[4], 4) }), " " + label + " · row " + e[1] + " · instance " + inst[0] + " · " + where]),
        drawn]);
    }));
  }
  function visibleToken(t) {
    return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍") || "∅";
  }
  function textExample(v, e, acts, peak) {
    var tokens = v.tokens || [], start = v.start || 0, w = IDX.window === null || IDX.window === undefined ? 8 : IDX.window;
    var line = el("div", { class: "tokens" });
    for (var p = Math.max(start, e[3] - w); p <= e[3] + w && p - start < tokens.length; p++) {
      var a = acts[p] || 0;
      var span = el("span", { class: p === e[3] ? "tok own" : "tok", title: "position " + p + ": " + num(a, 4) });
      span.textContent = visibleToken(tokens[p - start]);
      var bg = shade(a / peak);
      if (bg) span.style.backgroundColor = bg;
      line.appendChild(span);
    }
    return line;
  }
  function tspExample(v, e, acts, peak) {
    var coords = v.coords || [], tour = v.tour || [], S = 220, P = 10;
    var xs = coords.map(function (c) { return c[0]; }), ys = coords.map(function (c) { return c[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    var scale = (S - 2 * P) / Math.max(x1 - x0, y1 - y0, 1e-9);
    function X(c) { return (P + (c[0] - x0) * scale).toFixed(1); }
    function Y(c) { return (S - P - (c[1] - y0) * scale).toFixed(1); }
    var svg = svgEl("svg", { viewBox: "0 0 " + S + " " + S, class: "tsp", role: "img" });
    if (tour.length > 1) {
      var pts = tour.concat([tour[0]]).filter(function (c) { return coords[c]; }).map(function (c) { return X(coords[c]) + "," + Y(coords[c]); });
      svg.appendChild(svgEl("polyline", { points: pts.join(" "), class: "tour" }, svgTitle("the policy's tour")));
    }
    coords.forEach(function (c, i) {
      if (i === e[3]) return;
      var a = acts[i] || 0;
      svg.appendChild(svgEl("circle", { cx: X(c), cy: Y(c), r: 3.6, class: "city", fill: shade(a / peak) || "#fff" },
        svgTitle("city " + i + ": " + num(a, 4))));
    });
    if (coords[e[3]]) {
      var c = coords[e[3]];
      svg.appendChild(svgEl("circle", { cx: X(c), cy: Y(c), r: 6.5, class: "city firing", fill: shade(e[4] / peak) || "#fff",
        "data-city": e[3] }, svgTitle("city " + e[3] + " (this row): " + num(e[4], 4))));
    }
    return svg;
  }
  function tensorExample(v, e) {
    var values = v.values || [];
    var peak = Math.max.apply(null, values.map(function (x) { return Math.abs(x); }).concat([1e-12]));
    var strip = el("div", { class: "values" }, values.map(function (x, i) {
      var frac = Math.min(Math.abs(x) / peak, 1);
      var cell = el("span", { class: "val", title: "[" + i + "] " + x, text: num(x, 3) });
      cell.style.backgroundColor = x >= 0 ? "rgba(214, 96, 20," + (0.08 + 0.6 * frac).toFixed(2) + ")"
        : "rgba(40, 100, 200," + (0.08 + 0.6 * frac).toFixed(2) + ")";
      return cell;
    }));
    if (!values.length) return el("div", { class: "muted", text: "no input values recorded for this subject" });
    var shape = v.shape ? "input shape [" + v.shape.join(", ") + "]" : "input";
    return el("div", null, [el("div", { class: "muted", text: shape + ", first " + values.length + " values" }), strip]);
  }

  /* ---------- routing ---------- */
  function render() {
    readState();
    applyTable();
    if (state.feature !== "") {
      showFeature(parseInt(state.feature, 10));
    } else {
      document.getElementById("feature-view").hidden = true;
      document.getElementById("table-view").hidden = false;
      root.setAttribute("data-view", "table");
      root.setAttribute("data-ready", "1");
    }
  }

  function summaryText() {
    var b = IDX.band || {};
    var parts = [IDX.kind + " subject", N + " latents"];
    if (IDX.rows !== null && IDX.rows !== undefined) parts.push(IDX.rows + " rows analysed");
    if (IDX.alive_fraction !== null && IDX.alive_fraction !== undefined) parts.push(pct(IDX.alive_fraction) + " alive");
    if (b.low !== null && b.low !== undefined) parts.push(b.count + " in the frequency band [" + pct(b.low) + ", " + pct(b.high) + "]");
    return parts.join(" · ");
  }

  function start() {
    IDX = STORE.index;
    if (!IDX) { recordError("data/index.js did not load"); return; }
    N = IDX.latents;
    document.title = "Features · " + IDX.experiment;
    document.getElementById("title").textContent = "Features of " + IDX.experiment;
    document.getElementById("summary").textContent = summaryText();
    textLower = IDX.text.map(function (t) { return String(t).toLowerCase(); });
    columns = makeColumns();
    buildTable();
    buildFilters();
    renderInterventions();
    window.addEventListener("hashchange", render);
    document.addEventListener("keydown", function (e) {
      if (state.feature === "" || /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName)) return;
      if (e.key === "Escape") navigate({ feature: "" }, false);
      else if ((e.key === "ArrowLeft" || e.key === "k") && view && view.prev !== null) navigate({ feature: String(view.prev) }, false);
      else if ((e.key === "ArrowRight" || e.key === "j") && view && view.next !== null) navigate({ feature: String(view.next) }, false);
    });
    render();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();


(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("qkv-data").textContent);
  var ROW = 22, WIDTH = 280, MIN_W = 0.004, THUMB = 76;
  var nQ = DATA.query_tokens.length, nK = DATA.tokens.length, S = DATA.scale;
  var state = {layer: 0, head: "all", hover: null, pinned: null, view: "head"};
  var canvas = document.getElementById("head-canvas");
  var qCol = document.getElementById("query-col"), kCol = document.getElementById("key-col");
  var layerSel = document.getElementById("layer-select"), headSel = document.getElementById("head-select");
  var swatches = document.getElementById("swatches");
  var qEls = [], kEls = [];

  function hue(h, n) { return Math.round(360 * h / Math.max(n, 1)) % 360; }
  function color(h, n) { return "hsl(" + hue(h, n) + ",72%,42%)"; }
  function rgb(h, n) {           // the same colour as color(h, n), as [r, g, b] in 0..255
    var s = 0.72, l = 0.42, c = (1 - Math.abs(2 * l - 1)) * s, hp = hue(h, n) / 60;
    var x = c * (1 - Math.abs(hp % 2 - 1)), m = l - c / 2, t;
    if (hp < 1) t = [c, x, 0]; else if (hp < 2) t = [x, c, 0]; else if (hp < 3) t = [0, c, x];
    else if (hp < 4) t = [0, x, c]; else if (hp < 5) t = [x, 0, c]; else t = [c, 0, x];
    return [Math.round((t[0] + m) * 255), Math.round((t[1] + m) * 255), Math.round((t[2] + m) * 255)];
  }
  function nHeads(l) { return DATA.layers[l].heads; }
  function heads() {
    if (state.head === "all") { var a = []; for (var h = 0; h < nHeads(state.layer); h++) a.push(h); return a; }
    return [state.head];
  }
  function focus() { return state.pinned || state.hover; }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---- head view ---------------------------------------------------------
  function buildTokens(col, toks, side, store) {
    toks.forEach(function (t, i) {
      var e = el("div", "token", t === "" ? "\u2205" : t);
      e.title = (side === "q" ? "query " : "key ") + i + ": " + t;
      e.dataset.side = side; e.dataset.index = i;
      e.addEventListener("mouseenter", function () { state.hover = {side: side, index: i}; draw(); });
      e.addEventListener("mouseleave", function () { state.hover = null; draw(); });
      e.addEventListener("click", function () {
        var p = state.pinned;
        state.pinned = (p && p.side === side && p.index === i) ? null : {side: side, index: i};
        draw();
      });
      col.appendChild(e); store.push(e);
    });
  }

  function sizeCanvas() {
    var h = Math.max(nQ, nK) * ROW, dpr = Math.min(window.devicePixelRatio || 1, 2);
    if (h * dpr > 30000) dpr = 1;
    canvas.width = Math.round(WIDTH * dpr); canvas.height = Math.round(h * dpr);
    canvas.style.width = WIDTH + "px"; canvas.style.height = h + "px";
    canvas._dpr = dpr;
  }

  function draw() {
    var ctx = canvas.getContext("2d"), dpr = canvas._dpr, L = DATA.layers[state.layer], hs = heads();
    var f = focus(), n = 0, sum = 0, shade = new Float64Array(f ? (f.side === "q" ? nK : nQ) : 0);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, WIDTH, Math.max(nQ, nK) * ROW);
    ctx.lineWidth = 2;
    hs.forEach(function (h) {
      var W = L.weights[h];
      ctx.strokeStyle = color(h, L.heads);
      var q0 = 0, q1 = nQ, k0 = 0, k1 = nK;
      if (f && f.side === "q") { q0 = f.index; q1 = f.index + 1; }
      if (f && f.side === "k") { k0 = f.index; k1 = f.index + 1; }
      for (var q = q0; q < q1; q++) {
        for (var k = k0; k < k1; k++) {
          var w = W[q * nK + k] / S;
          if (f) shade[f.side === "q" ? k : q] += w / hs.length;
          if (w < MIN_W) continue;
          ctx.globalAlpha = Math.min(1, w);
          ctx.beginPath(); ctx.moveTo(0, q * ROW + ROW / 2); ctx.lineTo(WIDTH, k * ROW + ROW / 2); ctx.stroke();
          n += 1; sum += w * (1 + ((q * nK + k) % 97)) * (h + 1);
        }
      }
    });
    ctx.globalAlpha = 1;
    // token shading: the focused token's weights, averaged over the drawn heads
    qEls.concat(kEls).forEach(function (e) { e.style.background = ""; e.classList.remove("focus", "pinned"); });
    if (f) {
      var own = (f.side === "q" ? qEls : kEls)[f.index], other = f.side === "q" ? kEls : qEls;
      own.classList.add(state.pinned ? "pinned" : "focus");
      for (var i = 0; i < shade.length; i++) {
        if (shade[i] > 0) other[i].style.background = "rgba(47,111,222," + Math.min(1, shade[i]).toFixed(3) + ")";
      }
    }
    var fs = f ? f.side + f.index : "none";
    canvas.dataset.layer = state.layer; canvas.dataset.head = state.head; canvas.dataset.focus = fs;
    canvas.dataset.drawn = [state.layer, state.head, fs, n, sum.toFixed(4)].join("|");
  }

  function buildHeadControls() {
    var H = nHeads(state.layer);
    headSel.textContent = ""; swatches.textContent = "";
    headSel.appendChild(new Option("all heads", "all"));
    var all = el("button", "swatch all", "all");
    all.type = "button"; all.title = "all heads"; all.dataset.head = "all";
    all.addEventListener("click", function () { select(state.layer, "all"); });
    swatches.appendChild(all);
    for (var h = 0; h < H; h++) {
      headSel.appendChild(new Option("head " + h, String(h)));
      var s = el("button", "swatch");
      s.type = "button"; s.title = "head " + h; s.dataset.head = h; s.style.background = color(h, H);
      s.addEventListener("click", (function (hh) { return function () { select(state.layer, hh); }; })(h));
      swatches.appendChild(s);
    }
  }

  function syncControls() {
    layerSel.value = String(state.layer);
    headSel.value = String(state.head);
    Array.prototype.forEach.call(swatches.children, function (s) {
      s.classList.toggle("active", s.dataset.head === String(state.head));
    });
  }

  function select(layer, head) {
    if (typeof layer === "string") {
      var idx = DATA.layers.map(function (l) { return l.name; }).indexOf(layer);
      if (idx < 0 && /^\d+$/.test(layer)) idx = Number(layer);
      layer = idx;
    }
    if (!(layer >= 0 && layer < DATA.layers.length)) throw new Error("qkvViewer.select: no layer " + layer);
    if (head === undefined || head === null) head = "all";
    if (head !== "all") {
      head = Number(head);
      if (!(head >= 0 && head < nHeads(layer) && head === Math.floor(head))) {
        throw new Error("qkvViewer.select: layer " + layer + " has no head " + head);
      }
    }
    var rebuild = layer !== state.layer || !headSel.options.length;
    state.layer = layer; state.head = head;
    if (rebuild) buildHeadControls();
    syncControls(); draw();
    return api.state();
  }

  // ---- model view --------------------------------------------------------
  function buildModel() {
    var grid = document.getElementById("model-grid"), maxH = 0;
    DATA.layers.forEach(function (L) { maxH = Math.max(maxH, L.heads); });
    grid.style.gridTemplateColumns = "auto repeat(" + maxH + ", " + THUMB + "px)";
    grid.appendChild(el("div", "axis", ""));
    for (var h = 0; h < maxH; h++) grid.appendChild(el("div", "axis", "head " + h));
    var off = document.createElement("canvas");
    off.width = nK; off.height = nQ;
    var octx = off.getContext("2d");
    DATA.layers.forEach(function (L, l) {
      var lab = el("div", "axis row", L.name); lab.title = L.name; grid.appendChild(lab);
      for (var h = 0; h < maxH; h++) {
        if (h >= L.heads) { grid.appendChild(el("div")); continue; }
        var W = L.weights[h], mx = 1, i;
        for (i = 0; i < W.length; i++) if (W[i] > mx) mx = W[i];
        var img = octx.createImageData(nK, nQ), c = rgb(h, L.heads);
        for (i = 0; i < W.length; i++) {
          var a = W[i] / mx, p = 4 * i;      // blend white -> head colour by a
          img.data[p] = Math.round(255 + (c[0] - 255) * a);
          img.data[p + 1] = Math.round(255 + (c[1] - 255) * a);
          img.data[p + 2] = Math.round(255 + (c[2] - 255) * a);
          img.data[p + 3] = 255;
        }
        octx.putImageData(img, 0, 0);
        var t = document.createElement("canvas");
        t.className = "thumb"; t.width = THUMB; t.height = THUMB;
        t.dataset.layer = l; t.dataset.head = h; t.title = L.name + ", head " + h;
        var tctx = t.getContext("2d");
        tctx.imageSmoothingEnabled = nK > THUMB || nQ > THUMB;
        tctx.drawImage(off, 0, 0, THUMB, THUMB);
        t.addEventListener("click", (function (ll, hh) {
          return function () { select(ll, hh); show("head"); };
        })(l, h));
        grid.appendChild(t);
      }
    });
  }

  function show(view) {
    if (view !== "head" && view !== "model") throw new Error("qkvViewer.show: view is 'head' or 'model'");
    state.view = view;
    document.getElementById("head-view").hidden = view !== "head";
    document.getElementById("model-view").hidden = view !== "model";
    document.getElementById("tab-head").classList.toggle("active", view === "head");
    document.getElementById("tab-model").classList.toggle("active", view === "model");
  }

  var api = {
    layers: DATA.layers.map(function (l) { return l.name; }),
    heads: function (l) { return nHeads(l); },
    select: select,
    focus: function (side, index) {
      if (side === null || side === undefined) { state.pinned = null; }
      else {
        if ((side !== "q" && side !== "k") || !(index >= 0 && index < (side === "q" ? nQ : nK))) {
          throw new Error("qkvViewer.focus: side is 'q' or 'k' and index a token position");
        }
        state.pinned = {side: side, index: index};
      }
      draw(); return api.state();
    },
    show: function (view) { show(view); return api.state(); },
    weight: function (l, h, q, k) { return DATA.layers[l].weights[h][q * nK + k] / S; },
    state: function () {
      var f = focus();
      return {layer: state.layer, layerName: DATA.layers[state.layer].name, head: state.head,
              focus: f ? {side: f.side, index: f.index} : null, view: state.view, drawn: canvas.dataset.drawn};
    }
  };

  DATA.layers.forEach(function (L, l) { layerSel.appendChild(new Option(L.name, String(l))); });
  layerSel.addEventListener("change", function () {
    var l = Number(layerSel.value), h = state.head;
    select(l, h !== "all" && h < nHeads(l) ? h : "all");
  });
  headSel.addEventListener("change", function () { select(state.layer, headSel.value); });
  document.getElementById("tab-head").addEventListener("click", function () { show("head"); });
  document.getElementById("tab-model").addEventListener("click", function () { show("model"); });
  buildTokens(qCol, DATA.query_tokens, "q", qEls);
  buildTokens(kCol, DATA.tokens, "k", kEls);
  sizeCanvas();
  buildModel();
  select(0, "all");
  api.ready = true;
  window.qkvViewer = api;
})();

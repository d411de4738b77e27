(function () {
  "use strict";
  // The image view of qkv.viz.image_html: plain ES5, no libraries, all data in #qkv-data.
  var DATA = JSON.parse(document.getElementById("qkv-data").textContent);
  var H = DATA.height, W = DATA.width, gh = DATA.grid[0], gw = DATA.grid[1], P = gh * gw;
  var LEAD = DATA.lead, N = LEAD + P, S = DATA.scale, CMAP = DATA.cmap, ALPHA = DATA.alpha;
  var ZOOM = Math.max(1, Math.floor(360 / Math.max(H, W)));
  var state = {layer: 0, head: "mean", query: 0, hover: null};
  var canvas = document.getElementById("image-canvas");
  var layerSel = document.getElementById("layer-select"), headSel = document.getElementById("head-select");
  var clsBtn = document.getElementById("cls-button"), readout = document.getElementById("readout");
  var off = document.createElement("canvas");
  off.width = W; off.height = H;
  canvas.width = W * ZOOM; canvas.height = H * ZOOM;

  function nHeads(l) { return l === "rollout" ? 0 : DATA.layers[l].heads; }
  function patchOf(q) { return q < LEAD ? null : [Math.floor((q - LEAD) / gw), (q - LEAD) % gw]; }
  function queryName(q) {
    var p = patchOf(q);
    return p ? "patch (" + p[0] + ", " + p[1] + "), token " + q : (q === 0 ? "CLS token" : "token " + q);
  }

  // the current map: (P,) weights of the query over the patches
  function currentMap() {
    var m = new Float64Array(P), j, h;
    if (state.layer === "rollout") {
      for (j = 0; j < P; j++) m[j] = DATA.rollout[state.query * P + j] / S;
      return m;
    }
    var L = DATA.layers[state.layer];
    var hs = state.head === "mean" ? L.weights.map(function (_, i) { return i; }) : [state.head];
    for (h = 0; h < hs.length; h++) {
      var Wt = L.weights[hs[h]];
      for (j = 0; j < P; j++) m[j] += Wt[state.query * P + j] / S / hs.length;
    }
    return m;
  }

  function draw() {
    var m = currentMap(), mx = -Infinity, mn = Infinity, j, sum = 0;
    for (j = 0; j < P; j++) { mx = Math.max(mx, m[j]); mn = Math.min(mn, m[j]); sum += m[j] * (j + 1); }
    var octx = off.getContext("2d"), img = octx.createImageData(W, H);
    for (var y = 0; y < H; y++) {
      var r = Math.floor(y * gh / H);
      for (var x = 0; x < W; x++) {
        var p = r * gw + Math.floor(x * gw / W), i = 4 * (y * W + x), s = 3 * (y * W + x);
        var c = 3 * Math.min(255, Math.max(0, Math.round(mx > mn ? 255 * (m[p] - mn) / (mx - mn) : 0)));
        img.data[i] = Math.round((1 - ALPHA) * DATA.pixels[s] + ALPHA * CMAP[c]);
        img.data[i + 1] = Math.round((1 - ALPHA) * DATA.pixels[s + 1] + ALPHA * CMAP[c + 1]);
        img.data[i + 2] = Math.round((1 - ALPHA) * DATA.pixels[s + 2] + ALPHA * CMAP[c + 2]);
        img.data[i + 3] = 255;
      }
    }
    octx.putImageData(img, 0, 0);
    var ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, W * ZOOM, H * ZOOM);
    var pw = W * ZOOM / gw, ph = H * ZOOM / gh, qp = patchOf(state.query);
    if (qp) {
      ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 3;
      ctx.strokeRect(qp[1] * pw + 1.5, qp[0] * ph + 1.5, pw - 3, ph - 3);
    }
    if (state.hover !== null) {
      ctx.strokeStyle = "rgba(255,255,255,0.8)"; ctx.lineWidth = 1;
      ctx.strokeRect((state.hover % gw) * pw + 0.5, Math.floor(state.hover / gw) * ph + 0.5, pw - 1, ph - 1);
    }
    canvas.dataset.layer = state.layer; canvas.dataset.head = state.head; canvas.dataset.query = state.query;
    canvas.dataset.max = mx.toFixed(4); canvas.dataset.min = mn.toFixed(4);
    canvas.dataset.drawn = [state.layer, state.head, state.query, sum.toFixed(6)].join("|");
    document.getElementById("query-label").textContent = "query: " + queryName(state.query);
    clsBtn.classList.toggle("active", state.query < LEAD);
    readout.textContent = state.hover === null ? "hover a patch to read its weight" :
      "patch (" + Math.floor(state.hover / gw) + ", " + state.hover % gw + "): " + m[state.hover].toFixed(4);
  }

  function drawColorbar() {
    var cb = document.getElementById("colorbar"), ctx = cb.getContext("2d");
    for (var y = 0; y < cb.height; y++) {
      var c = 3 * Math.round(255 * (1 - y / (cb.height - 1)));
      ctx.fillStyle = "rgb(" + CMAP[c] + "," + CMAP[c + 1] + "," + CMAP[c + 2] + ")";
      ctx.fillRect(0, y, cb.width, 1);
    }
  }

  function buildHeads() {
    headSel.textContent = "";
    headSel.appendChild(new Option(state.layer === "rollout" ? "(all layers and heads)" : "mean of heads", "mean"));
    for (var h = 0; h < nHeads(state.layer); h++) headSel.appendChild(new Option("head " + h, String(h)));
    headSel.disabled = state.layer === "rollout";
  }

  function select(layer, head) {
    if (layer !== "rollout") {
      layer = Number(layer);
      if (!(layer >= 0 && layer < DATA.layers.length && layer === Math.floor(layer))) {
        throw new Error("qkvViewer.select: no layer " + layer);
      }
    } else if (!DATA.rollout) { throw new Error("qkvViewer.select: this page has no rollout"); }
    if (head === undefined || head === null || layer === "rollout") head = "mean";
    if (head !== "mean") {
      head = Number(head);
      if (!(head >= 0 && head < nHeads(layer) && head === Math.floor(head))) {
        throw new Error("qkvViewer.select: layer " + layer + " has no head " + head);
      }
    }
    state.layer = layer; state.head = head;
    buildHeads();
    layerSel.value = String(layer); headSel.value = String(head);
    draw();
    return api.state();
  }

  function query(q) {
    if (Object.prototype.toString.call(q) === "[object Array]") q = LEAD + q[0] * gw + q[1];
    if (!(q >= 0 && q < N && q === Math.floor(q))) throw new Error("qkvViewer.query: no token " + q);
    state.query = q; draw();
    return api.state();
  }

  function patchAt(ev) {
    var rect = canvas.getBoundingClientRect();
    var x = (ev.clientX - rect.left) * canvas.width / rect.width, y = (ev.clientY - rect.top) * canvas.height / rect.height;
    var r = Math.min(gh - 1, Math.floor(y / (canvas.height / gh))), c = Math.min(gw - 1, Math.floor(x / (canvas.width / gw)));
    return r * gw + c;
  }

  var api = {
    layers: DATA.layers.map(function (l) { return l.name; }),
    grid: [gh, gw], lead: LEAD,
    select: select, query: query,
    weight: function (l, h, q, patch) { return DATA.layers[l].weights[h][q * P + patch] / S; },
    map: function () { return Array.prototype.slice.call(currentMap()); },
    state: function () {
      return {view: "image", layer: state.layer, head: state.head, query: state.query,
              patch: patchOf(state.query), drawn: canvas.dataset.drawn};
    }
  };

  DATA.layers.forEach(function (L, l) { layerSel.appendChild(new Option(L.name, String(l))); });
  if (DATA.rollout) layerSel.appendChild(new Option("rollout (all layers)", "rollout"));
  layerSel.addEventListener("change", function () {
    var l = layerSel.value === "rollout" ? "rollout" : Number(layerSel.value), h = state.head;
    select(l, h !== "mean" && h < nHeads(l) ? h : "mean");
  });
  headSel.addEventListener("change", function () { select(state.layer, headSel.value); });
  clsBtn.hidden = LEAD === 0;
  clsBtn.addEventListener("click", function () { query(0); });
  canvas.addEventListener("click", function (ev) { query(LEAD + patchAt(ev)); });
  canvas.addEventListener("mousemove", function (ev) {
    var p = patchAt(ev);
    if (p !== state.hover) { state.hover = p; draw(); }
  });
  canvas.addEventListener("mouseleave", function () { state.hover = null; draw(); });
  drawColorbar();
  state.query = DATA.start.query;
  select(DATA.start.layer, DATA.start.head);
  api.ready = true;
  window.qkvViewer = api;
})();

// carbseg HTML report: summary, gallery and image view of one evaluation (see builder.py).
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("page-data").textContent);
  const IGNORE = 255;
  const CLASSES = DATA.classes;
  const IMAGES = DATA.images;
  const $ = (id) => document.getElementById(id);
  const fmt = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(1));
  const el = (tag, props, children) => {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) node.append(child);
    return node;
  };
  const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;

  // ---------------------------------------------------------------- header and summary
  function renderHeader() {
    const report = DATA.report_json === null ? null : JSON.parse(DATA.report_json);
    $("title").textContent = "carbseg report: " + (DATA.source.evaluated || "evaluation");
    document.title = $("title").textContent;
    const rows = Object.assign({}, DATA.source, { created: DATA.created + " by " + DATA.generator });
    for (const [key, value] of Object.entries(rows)) {
      $("source").append(el("dt", { textContent: key }), el("dd", { textContent: String(value) }));
    }
    if (report === null) {
      $("headline").textContent = IMAGES.length + " images (no ground truth: no scores)";
      $("summary").querySelector(".panels").hidden = true;
      $("json-details").hidden = true;
      return;
    }
    const miou = el("b", { id: "miou", textContent: fmt(report.miou) });
    miou.dataset.value = JSON.stringify(report.miou);
    const acc = el("span", { id: "pixel-acc", textContent: fmt(report.pixel_acc) });
    acc.dataset.value = JSON.stringify(report.pixel_acc);
    const count = el("span", { id: "num-images", textContent: String(report.num_images) });
    $("headline").append("mIoU ", miou, " %, pixel accuracy ", acc, " %, ", count, " images");
    $("json").textContent = DATA.report_json;
    CLASSES.forEach((name, c) => {
      const value = report.iou[name];
      const bar = el("div", { className: "bar", title: `${name}: ${value === null ? "n/a" : value} %` }, [
        el("span", { textContent: name }),
        el("div", { className: "track" }, [el("div", { className: "fill" })]),
        el("span", { className: "value", textContent: fmt(value) }),
      ]);
      bar.dataset.class = name;
      bar.dataset.value = JSON.stringify(value);
      bar.querySelector(".fill").style.width = (value || 0) + "%";
      bar.querySelector(".fill").style.background = rgb(DATA.palette[c]);
      bar.addEventListener("click", () => {
        // Two clicks to the worst images of a class: this one, then the first card.
        $("filter").value = "class:" + c;
        $("sort").value = "class:" + c;
        renderGallery();
        $("gallery").scrollIntoView();
        const first = visibleCards()[0];
        if (first) first.focus({ preventScroll: true });
      });
      $("bars").append(bar);
    });
    renderConfusion();
  }

  function renderConfusion() {
    const table = $("confusion");
    if (!DATA.confusion) return;
    const head = el("tr", {}, [el("th")]);
    CLASSES.forEach((name) => head.append(el("th", { className: "col", textContent: name })));
    head.append(el("th", { className: "col", textContent: "ignore" }));
    table.append(head);
    DATA.confusion.forEach((row, g) => {
      const counts = row.concat([DATA.missed[g]]);
      const total = counts.reduce((a, b) => a + b, 0);
      const tr = el("tr", {}, [el("th", { className: "row", textContent: CLASSES[g] })]);
      counts.forEach((n, p) => {
        const share = total ? n / total : 0;
        const predicted = p < CLASSES.length ? CLASSES[p] : "ignore";
        const td = el("td", { title: `${CLASSES[g]} -> ${predicted}: ${(100 * share).toFixed(2)} % (${n} px)` });
        td.dataset.share = String(share);
        const shade = Math.round(255 * (1 - share));
        td.style.background = p === g ? `rgb(${shade},255,${shade})` : `rgb(255,${shade},${shade})`;
        if (share >= 0.995) td.style.background = p === g ? "rgb(0,170,0)" : "rgb(200,0,0)";
        tr.append(td);
      });
      table.append(tr);
    });
  }

  // ---------------------------------------------------------------- gallery
  const cards = [];
  let order = []; // image positions (in IMAGES) in the gallery's current order, filtered

  function scoreOf(image, key) {
    if (key.startsWith("class:")) return image.iou ? image.iou[Number(key.slice(6))] : null;
    return image.miou === undefined ? null : image.miou;
  }

  function buildControls() {
    const sort = $("sort");
    const scored = DATA.has_gt;
    if (scored) {
      sort.append(el("option", { value: "worst", textContent: "worst mIoU first" }));
      sort.append(el("option", { value: "best", textContent: "best mIoU first" }));
    }
    sort.append(el("option", { value: "id", textContent: "image id" }));
    if (scored) {
      CLASSES.forEach((name, c) => sort.append(el("option", { value: "class:" + c, textContent: name + " IoU, worst first" })));
    }
    const filter = $("filter");
    filter.append(el("option", { value: "all", textContent: "all images" }));
    CLASSES.forEach((name, c) => filter.append(el("option", { value: "class:" + c, textContent: "images with " + name })));
    sort.addEventListener("change", renderGallery);
    filter.addEventListener("change", renderGallery);
  }

  function buildCards() {
    const fragment = document.createDocumentFragment();
    IMAGES.forEach((image, k) => {
      const img = el("img", { src: `thumbs/${image.n}.jpg`, alt: image.id, loading: "lazy", decoding: "async" });
      img.width = Math.min(image.w, 256);
      img.height = Math.round(img.width * image.h / image.w);
      const score = el("span", { className: "score" });
      const card = el("a", { className: "card", href: `#image-${image.n}`, title: image.id }, [
        img, el("div", { className: "caption" }, [el("span", { className: "id", textContent: image.id }), score]),
      ]);
      card.dataset.n = String(image.n);
      card.dataset.position = String(k);
      cards.push({ card, score });
      fragment.append(card);
    });
    $("cards").append(fragment);
  }

  function renderGallery() {
    const key = $("sort").value;
    const filter = $("filter").value;
    let positions = IMAGES.map((_, k) => k);
    if (filter.startsWith("class:")) {
      const c = Number(filter.slice(6));
      // Images whose ground truth holds the class (without ground truth: whose prediction does).
      positions = positions.filter((k) => (DATA.has_gt ? IMAGES[k].gt : IMAGES[k].pred).includes(c));
    }
    const byId = (a, b) => (IMAGES[a].id < IMAGES[b].id ? -1 : IMAGES[a].id > IMAGES[b].id ? 1 : 0);
    if (key === "id") {
      positions.sort(byId);
    } else {
      const sign = key === "best" ? -1 : 1;
      positions.sort((a, b) => {
        const sa = scoreOf(IMAGES[a], key), sb = scoreOf(IMAGES[b], key);
        if (sa === null && sb === null) return byId(a, b);
        if (sa === null) return 1; // images without the score last
        if (sb === null) return -1;
        return sign * (sa - sb) || byId(a, b);
      });
    }
    order = positions;
    const shown = new Set(positions);
    const container = $("cards");
    const fragment = document.createDocumentFragment();
    for (const k of positions) {
      const { card, score } = cards[k];
      const value = key === "id" ? scoreOf(IMAGES[k], "worst") : scoreOf(IMAGES[k], key);
      score.textContent = DATA.has_gt ? fmt(value) : "";
      score.dataset.value = JSON.stringify(value === undefined ? null : value);
      card.hidden = false;
      fragment.append(card);
    }
    cards.forEach(({ card }, k) => { if (!shown.has(k)) { card.hidden = true; fragment.append(card); } });
    container.append(fragment);
    $("count").textContent = `${positions.length} of ${IMAGES.length} images`;
    $("count").dataset.count = String(positions.length);
  }

  const visibleCards = () => order.map((k) => cards[k].card);

  function galleryKeys(event) {
    const list = visibleCards();
    const at = list.indexOf(document.activeElement);
    if (at < 0 || !["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "Home", "End"].includes(event.key)) return;
    const top = list[0].getBoundingClientRect().top;
    let columns = list.findIndex((card) => card.getBoundingClientRect().top !== top);
    if (columns < 1) columns = list.length;
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns, ArrowDown: columns }[event.key];
    const target = event.key === "Home" ? 0 : event.key === "End" ? list.length - 1 : at + step;
    if (target >= 0 && target < list.length) {
      list[target].focus();
      event.preventDefault();
    }
  }

  // ---------------------------------------------------------------- image view
  const labels = new Map(); // image number -> ImageData of its label PNG (R pred, G gt, B teacher)
  const waiting = new Map();
  window.carbsegLabels = function (n, uri) {
    const image = new Image();
    image.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
      const context = canvas.getContext("2d", { willReadFrequently: true });
      context.drawImage(image, 0, 0);
      labels.set(n, context.getImageData(0, 0, canvas.width, canvas.height));
      if (labels.size > 24) labels.delete(labels.keys().next().value); // a few recent images
      (waiting.get(n) || []).forEach((resolve) => resolve(labels.get(n)));
      waiting.delete(n);
    };
    image.src = uri;
  };
  function loadLabels(n) {
    if (labels.has(n)) return Promise.resolve(labels.get(n));
    return new Promise((resolve) => {
      if (!waiting.has(n)) {
        waiting.set(n, []);
        // A script tag, not fetch(): file:// pages may load scripts but not fetch files.
        const script = el("script", { src: `labels/${n}.js` });
        script.onload = () => script.remove();
        document.head.append(script);
      }
      waiting.get(n).push(resolve);
    });
  }

  const LAYERS = [
    { key: "photo", name: "photo only" },
    { key: "pred", name: DATA.prediction_name },
  ];
  if (DATA.has_gt) LAYERS.push({ key: "gt", name: "ground truth" }, { key: "error", name: "error map" });
  if (DATA.has_teacher) LAYERS.push({ key: "teacher", name: "teacher" }, { key: "carb", name: "teacher vs model (CARB regions)" });

  const state = { n: null, layer: DATA.has_gt ? "error" : "pred", highlight: -1 };
  const palette = new Uint8Array(256 * 3);
  DATA.palette.forEach((c, k) => palette.set(c, 3 * k));
  const colors = DATA.colors;

  function buildViewer() {
    LAYERS.forEach((layer, k) => {
      const input = el("input", { type: "radio", name: "layer", value: layer.key, checked: layer.key === state.layer });
      input.addEventListener("change", () => { state.layer = layer.key; drawLayer(); });
      $("layers").append(el("label", { title: `key ${k + 1}` }, [input, ` ${layer.name}`]));
    });
    const highlight = $("highlight");
    highlight.append(el("option", { value: "-1", textContent: "all classes" }));
    CLASSES.forEach((name, c) => highlight.append(el("option", { value: String(c), textContent: "only " + name })));
    highlight.addEventListener("change", () => { state.highlight = Number(highlight.value); drawLayer(); renderLegend(); });
    $("opacity").addEventListener("input", () => { $("overlay").style.opacity = $("opacity").value / 100; });
    $("overlay").style.opacity = $("opacity").value / 100;
    $("back").addEventListener("click", () => { location.hash = ""; });
    $("prev").addEventListener("click", () => step(-1));
    $("next").addEventListener("click", () => step(1));
    $("overlay").addEventListener("mousemove", hover);
    renderLegend();
  }

  function renderLegend() {
    const legend = $("legend");
    legend.textContent = "";
    const entry = (color, name, c) => {
      const row = el("div", { className: "entry" }, [el("span", { className: "swatch" }), el("span", { textContent: name })]);
      row.firstChild.style.background = rgb(color);
      if (c !== undefined) {
        row.classList.toggle("active", state.highlight === c);
        row.title = "click: highlight only " + name;
        row.addEventListener("click", () => {
          state.highlight = state.highlight === c ? -1 : c;
          $("highlight").value = String(state.highlight);
          drawLayer();
          renderLegend();
        });
      }
      legend.append(row);
    };
    legend.append(el("h2", { textContent: "Classes" }));
    CLASSES.forEach((name, c) => entry(DATA.palette[c], name, c));
    if (DATA.has_gt) {
      legend.append(el("h2", { textContent: "Error map" }));
      entry(colors.correct, "right"); entry(colors.wrong, "wrong"); entry(colors.ignored, "ignored (no ground truth)");
    }
    if (DATA.has_teacher) {
      legend.append(el("h2", { textContent: "CARB regions" }));
      entry(colors.consistent, "consistent (teacher = model)");
      entry(colors.inconsistent, "inconsistent (teacher != model)");
    }
  }

  function drawLayer() {
    const canvas = $("overlay");
    const data = state.n === null ? undefined : labels.get(state.n);
    if (!data) return;
    canvas.width = data.width;
    canvas.height = data.height;
    const context = canvas.getContext("2d");
    const out = context.createImageData(data.width, data.height);
    const src = data.data, dst = out.data, layer = state.layer, only = state.highlight;
    for (let i = 0; i < src.length; i += 4) {
      const pred = src[i], gt = src[i + 1], teacher = src[i + 2];
      let color = null;
      if (layer === "pred" || layer === "gt" || layer === "teacher") {
        const c = layer === "pred" ? pred : layer === "gt" ? gt : teacher;
        if (c !== IGNORE && c < CLASSES.length && (only < 0 || c === only)) color = palette.subarray(3 * c, 3 * c + 3);
      } else if (layer === "error") {
        if (only < 0 || gt === only || pred === only) {
          color = gt === IGNORE ? colors.ignored : gt === pred ? colors.correct : colors.wrong;
        }
      } else if (layer === "carb") {
        // CARB: the teacher's valid pixels split by agreement with the model; teacher-ignored pixels stay clear.
        if (teacher !== IGNORE && (only < 0 || teacher === only || pred === only)) {
          color = teacher === pred ? colors.consistent : colors.inconsistent;
        }
      }
      if (color) {
        dst[i] = color[0]; dst[i + 1] = color[1]; dst[i + 2] = color[2]; dst[i + 3] = 255;
      }
    }
    context.putImageData(out, 0, 0);
    canvas.dataset.layer = layer;
    canvas.dataset.highlight = String(only);
    canvas.dataset.drawn = String(state.n);
  }

  function hover(event) {
    const data = labels.get(state.n);
    if (!data) return;
    const box = event.target.getBoundingClientRect();
    const x = Math.min(data.width - 1, Math.floor((event.clientX - box.left) * data.width / box.width));
    const y = Math.min(data.height - 1, Math.floor((event.clientY - box.top) * data.height / box.height));
    const i = 4 * (y * data.width + x);
    const name = (c) => (c === IGNORE || c >= CLASSES.length ? "ignore" : CLASSES[c]);
    let text = `${DATA.prediction_name}: ${name(data.data[i])}`;
    if (DATA.has_gt) text += `, ground truth: ${name(data.data[i + 1])}`;
    if (DATA.has_teacher) text += `, teacher: ${name(data.data[i + 2])}`;
    $("hover").textContent = text;
  }

  function renderImageTable(image) {
    const table = $("image-iou");
    table.textContent = "";
    if (!image.iou) return;
    table.append(el("tr", {}, [el("th", { textContent: "class" }), el("th", { textContent: "IoU %" })]));
    table.append(el("tr", {}, [el("td", { textContent: "mIoU" }), el("td", { className: "num", textContent: fmt(image.miou) })]));
    image.iou.forEach((v, c) => {
      if (v !== null) table.append(el("tr", {}, [el("td", { textContent: CLASSES[c] }), el("td", { className: "num", textContent: fmt(v) })]));
    });
  }

  function openImage(n) {
    const k = IMAGES.findIndex((image) => image.n === n);
    if (k < 0) return closeImage();
    const image = IMAGES[k];
    state.n = n;
    $("gallery").hidden = true;
    $("summary").hidden = true;
    $("viewer").hidden = false;
    $("view-title").textContent = image.id + (DATA.has_gt ? ` (mIoU ${fmt(image.miou)} %)` : "");
    $("photo").src = `photos/${n}.jpg`;
    $("photo").width = image.w;
    $("photo").height = image.h;
    $("overlay").dataset.drawn = "";
    renderImageTable(image);
    loadLabels(n).then(() => { if (state.n === n) drawLayer(); });
    window.scrollTo(0, 0);
  }

  function closeImage() {
    const last = state.n;
    state.n = null;
    $("viewer").hidden = true;
    $("gallery").hidden = false;
    $("summary").hidden = false;
    const card = cards.find(({ card }) => card.dataset.n === String(last));
    if (card && !card.card.hidden) card.card.focus();
  }

  function step(delta) {
    const list = order.map((k) => IMAGES[k].n);
    const at = list.indexOf(state.n);
    const next = list[at + delta];
    if (next !== undefined) location.hash = `image-${next}`;
  }

  function route() {
    const match = /^#image-(\d+)$/.exec(location.hash);
    if (match) openImage(Number(match[1]));
    else if (state.n !== null) closeImage();
  }

  function keys(event) {
    if (event.target.tagName === "SELECT" || event.target.tagName === "INPUT" && event.target.type !== "radio") return;
    if (state.n === null) return galleryKeys(event);
    if (event.key === "Escape") location.hash = "";
    else if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "ArrowRight") step(1);
    else if (/^[1-9]$/.test(event.key) && Number(event.key) <= LAYERS.length) {
      state.layer = LAYERS[Number(event.key) - 1].key;
      document.querySelector(`input[name=layer][value=${state.layer}]`).checked = true;
      drawLayer();
    } else return;
    event.preventDefault();
  }

  renderHeader();
  buildControls();
  buildCards();
  renderGallery();
  buildViewer();
  window.addEventListener("hashchange", route);
  document.addEventListener("keydown", keys);
  route();
  window.carbsegReady = performance.now();
  document.body.dataset.ready = "1";
})();

"""The JupyterLab side of :class:`spotlib.explore.Explorer`: a token canvas (anywidget) and its controls.

The canvas draws the image and each token's sampled window; the browser sends ``add`` / ``move`` /
``remove`` messages, the Python side applies them to the explorer (which clamps into [0, 1]) and
sends the new positions back, so the explorer's state is the only truth.
"""

from __future__ import annotations

import anywidget
import ipywidgets as widgets
import traitlets

from . import (EXPLORER_PRIORS, Explorer, data_url, image_array, prediction_html, sleep_frame, to_png,
                      windows_strip)

_ESM = """
function render({ model, el }) {
  const canvas = document.createElement("canvas");
  canvas.className = "spot-canvas";
  canvas.tabIndex = 0;
  el.appendChild(canvas);
  const ctx = canvas.getContext("2d");
  const img = new Image();
  let drag = -1, dragAt = null;
  function size() { const s = model.get("size"); canvas.width = s; canvas.height = s; return s; }
  function draw() {
    const s = size();
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, s, s);
    if (img.complete && img.naturalWidth) ctx.drawImage(img, 0, 0, s, s);
    const [wh, ww] = model.get("window");
    const colour = model.get("snapped") ? "#33c3ff" : "#ff3b30";
    model.get("positions").forEach(([y, x], i) => {
      if (i === drag && dragAt) [y, x] = dragAt;
      ctx.strokeStyle = i === drag ? "#ffd60a" : colour;
      ctx.lineWidth = 2;
      ctx.strokeRect((x - ww / 2) * s, (y - wh / 2) * s, ww * s, wh * s);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.fillRect(x * s - 2, y * s - 2, 4, 4);
    });
  }
  function at(e) {
    const r = canvas.getBoundingClientRect();
    return [(e.clientY - r.top) / r.height, (e.clientX - r.left) / r.width];
  }
  function hit([y, x]) {
    const [wh, ww] = model.get("window"), pos = model.get("positions");
    for (let i = pos.length - 1; i >= 0; i--)
      if (Math.abs(pos[i][0] - y) <= wh / 2 && Math.abs(pos[i][1] - x) <= ww / 2) return i;
    return -1;
  }
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("mousedown", (e) => {
    const p = at(e), i = hit(p);
    if (e.shiftKey || e.button === 2) { if (i >= 0) model.send({ event: "remove", index: i }); return; }
    if (i >= 0) { drag = i; dragAt = p; draw(); } else model.send({ event: "add", y: p[0], x: p[1] });
  });
  canvas.addEventListener("mousemove", (e) => { if (drag >= 0) { dragAt = at(e); draw(); } });
  const release = (e) => {
    if (drag < 0) return;
    const [y, x] = at(e), i = drag;
    drag = -1; dragAt = null;
    model.send({ event: "move", index: i, y, x });
  };
  canvas.addEventListener("mouseup", release);
  canvas.addEventListener("mouseleave", release);
  img.onload = draw;
  model.on("change:image", () => { img.src = model.get("image"); });
  model.on("change:positions", draw);
  model.on("change:window", draw);
  model.on("change:snapped", draw);
  img.src = model.get("image");
  draw();
}
export default { render };
"""

_CSS = """
.spot-canvas { border: 1px solid #888; cursor: crosshair; image-rendering: pixelated; }
.spot-predictions .spot-row { display: flex; align-items: center; gap: 6px; font-size: 12px; line-height: 18px; }
.spot-predictions .spot-cls { width: 90px; overflow: hidden; white-space: nowrap; }
.spot-predictions .spot-bar { display: inline-block; height: 10px; background: #4c72b0; }
.spot-predictions .spot-name { font-weight: bold; margin-bottom: 4px; }
"""


ANY = -1  # the class filter's "any" (a Dropdown shows no selection for None)


class TokenCanvas(anywidget.AnyWidget):
    """The image with its tokens' windows; positions are (y, x) in [0, 1], ``window`` its (h, w) fraction."""

    _esm = _ESM
    _css = _CSS
    image = traitlets.Unicode("").tag(sync=True)
    positions = traitlets.List([]).tag(sync=True)
    window = traitlets.List([0.1, 0.1]).tag(sync=True)
    size = traitlets.Int(280).tag(sync=True)
    snapped = traitlets.Bool(False).tag(sync=True)


class ExplorerWidget(widgets.VBox):
    """Controls around a :class:`TokenCanvas`, bound to one :class:`Explorer`."""

    def __init__(self, explorer: Explorer, size: int = 280):
        self.explorer = ex = explorer
        H, W = ex.split.image_size
        self.canvas = TokenCanvas(size=size, window=[ex.window / H, ex.window / W])
        self.canvas.on_msg(self._on_canvas)
        names = list(ex.models)
        classes = [("any", ANY), *[(c, i) for i, c in enumerate(ex.split.classes)]]
        self.class_filter = widgets.Dropdown(options=classes, value=ANY, description="class")
        self.wrong_only = widgets.Dropdown(options=[("any image", ""), *[(f"misclassified by {n}", n) for n in names]],
                                           value="", description="show")
        self.picker = widgets.Dropdown(description="image")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="upload")
        self.prior = widgets.Dropdown(options=list(EXPLORER_PRIORS), value=ex.prior, description="prior")
        self.budget = widgets.IntSlider(value=ex.num_tokens, min=1, max=max(ex.grid_size[0] * ex.grid_size[1], ex.num_tokens),
                                        description="tokens", continuous_update=False)
        self.seed = widgets.BoundedIntText(value=ex.seed, min=0, max=2**31 - 1, description="seed")
        self.redraw = widgets.Button(description="redraw from prior")
        self.snap = widgets.ToggleButton(value=False, description="snap to grid")
        self.steps = widgets.BoundedIntText(value=30, min=1, max=500, description="steps")
        self.lr = widgets.BoundedFloatText(value=0.01, min=1e-4, max=0.2, step=0.001, description="lr")
        self.oracle_model = widgets.Dropdown(options=names, value=names[0], description="oracle on")
        self.run_oracle = widgets.Button(description="SPoT-ON", button_style="warning")
        self.predictions = widgets.HTML()
        self.misalignment = widgets.HTML()
        self.oracle_log = widgets.HTML()
        self.strip = widgets.Image(format="png")
        self.status = widgets.HTML()

        self.class_filter.observe(lambda _: self._refresh_picker(), "value")
        self.wrong_only.observe(lambda _: self._refresh_picker(), "value")
        self.picker.observe(self._on_pick, "value")
        self.upload.observe(self._on_upload, "value")
        for control in (self.prior, self.budget, self.seed):
            control.observe(lambda _: self._draw_prior(), "value")
        self.redraw.on_click(lambda _: self._draw_prior())
        self.snap.observe(lambda _: self.refresh(), "value")
        self.run_oracle.on_click(lambda _: self.animate_oracle())

        left = widgets.VBox([self.canvas, widgets.HTML("<small>click: add a token · drag: move · shift-click or "
                                                       "right-click: remove</small>"), self.strip])
        right = widgets.VBox([self.predictions, self.misalignment, self.oracle_log, self.status])
        controls = widgets.VBox([
            widgets.HBox([self.class_filter, self.wrong_only]), widgets.HBox([self.picker, self.upload]),
            widgets.HBox([self.prior, self.budget]), widgets.HBox([self.seed, self.redraw, self.snap]),
            widgets.HBox([self.oracle_model, self.steps, self.lr, self.run_oracle])])
        super().__init__([controls, widgets.HBox([left, right])])
        self._refresh_picker()
        self.refresh()

    # -- state -> view --------------------------------------------------------------------
    def shown_positions(self):
        return self.explorer.snapped() if self.snap.value else self.explorer.positions

    def refresh(self) -> None:
        """Redraw everything from the explorer's state."""
        ex = self.explorer
        self.canvas.image = data_url(to_png(image_array(ex.image)))
        self.canvas.snapped = self.snap.value
        self.canvas.positions = [[float(y), float(x)] for y, x in self.shown_positions().tolist()]
        label = None if ex.label is None else ex.split.classes[ex.label]
        self.predictions.value = prediction_html(ex.predict(self.shown_positions()), label)
        self.strip.value = to_png(windows_strip(ex.windows(self.shown_positions())))
        if ex.label is not None:
            free, snapped = ex.probabilities(ex.positions), ex.probabilities(ex.snapped())
            cells = ", ".join(f"{name} p(true) {100 * free[name][ex.label]:.1f} % subpixel, "
                              f"{100 * snapped[name][ex.label]:.1f} % snapped" for name in ex.models)
            self.misalignment.value = f"<small>misalignment on this image: {cells}</small>"
        else:
            self.misalignment.value = ""
        where = f"image {ex.index}" if ex.index is not None else "uploaded image"
        self.status.value = f"<small class='spot-status'>{where}; {len(ex.positions)} tokens</small>"

    def _refresh_picker(self) -> None:
        label = None if self.class_filter.value == ANY else self.class_filter.value
        indices = self.explorer.indices(label, self.wrong_only.value or None)
        current = self.explorer.index
        self.picker.options = indices
        if indices:
            self.picker.value = current if current in indices else indices[0]
        else:
            self.status.value = "<small>no image matches these filters</small>"

    # -- view -> state --------------------------------------------------------------------
    def _on_canvas(self, _widget, content, _buffers) -> None:
        event = content.get("event")
        if self.snap.value:  # edits act on the subpixel tokens; snapping is only a view of them
            self.snap.value = False
        if event == "add":
            self.explorer.add(content["y"], content["x"])
        elif event == "move":
            self.explorer.move(content["index"], content["y"], content["x"])
        elif event == "remove" and len(self.explorer.positions) > 1:
            self.explorer.remove(content["index"])
        self.refresh()

    def _on_pick(self, change) -> None:
        if change["new"] is not None and change["new"] != self.explorer.index:
            self.explorer.select(change["new"])
            self.refresh()

    def _on_upload(self, change) -> None:
        from PIL import Image
        import io

        files = change["new"]
        if files:
            self.explorer.upload(Image.open(io.BytesIO(bytes(files[0]["content"]))))
            self.refresh()

    def _draw_prior(self) -> None:
        self.explorer.draw(self.prior.value, self.budget.value, self.seed.value)
        self.refresh()

    def animate_oracle(self, frame_seconds: float = 0.05):
        """Run SPoT-ON from the current positions, show each step's positions and loss, keep the end point."""
        ex = self.explorer
        if ex.label is None:
            self.oracle_log.value = "<small>SPoT-ON needs a label: pick an image from the split</small>"
            return None
        self.snap.value = False
        result = ex.oracle(self.oracle_model.value, self.steps.value, self.lr.value)
        for t in range(result.trajectory.shape[1]):
            self.canvas.positions = result.trajectory[0, t].tolist()
            self.oracle_log.value = (f"<small>SPoT-ON on {self.oracle_model.value}: step {t}/{result.trajectory.shape[1] - 1}, "
                                     f"loss {float(result.loss[0, t]):.3f}</small>")
            sleep_frame(frame_seconds)
        ex.positions = result.positions[0].clone()
        losses = ", ".join(f"{v:.2f}" for v in result.loss[0].tolist())
        self.oracle_log.value = f"<small>SPoT-ON loss per step: {losses}</small>"
        self.refresh()
        return result


def build_widget(explorer: Explorer, size: int = 280) -> ExplorerWidget:
    return ExplorerWidget(explorer, size)

// Draws every <canvas data-chart="ID"> from the Chart.js config in <script type="application/json" id="ID">,
// on page load and in fragments htmx swaps in (the job's live progress). No inline script: the page's CSP allows
// scripts from /static only.
(function () {
  const PALETTE = ["#2a7f3f", "#5b7db1", "#c27c3a", "#8a5ba8", "#b14d5b", "#8c8c8c"];
  function draw(root) {
    if (!window.Chart) return;
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      if (canvas.dataset.drawn) return;
      const source = document.getElementById(canvas.dataset.chart);
      if (!source) return;
      const spec = JSON.parse(source.textContent);
      (spec.data.datasets || []).forEach(function (set, i) {
        const colour = PALETTE[i % PALETTE.length];
        set.borderColor = set.borderColor || colour;
        set.backgroundColor = set.backgroundColor || (spec.type === "bar" ? colour : colour + "33");
        set.spanGaps = true;
      });
      spec.options = Object.assign({responsive: true, maintainAspectRatio: false}, spec.options || {});
      new window.Chart(canvas, spec);
      canvas.dataset.drawn = "1";
    });
  }
  document.addEventListener("DOMContentLoaded", function () { draw(document); });
  document.addEventListener("htmx:load", function (event) { draw(event.detail.elt || document); });
})();

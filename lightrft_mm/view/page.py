"""The viewer page's inline stylesheet and script (no CDN, no network: the page opens from file://)."""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #f6f6f4; }
header.top { padding: 12px 20px; background: #fff; border-bottom: 1px solid #ddd; }
header.top h1 { font-size: 20px; margin: 0 0 6px; }
.summary { display: flex; flex-wrap: wrap; gap: 6px 18px; font-size: 13px; }
.summary b { color: #555; font-weight: 600; }
.curves { max-width: 100%; margin-top: 8px; border: 1px solid #ddd; }
.filters { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; align-items: center;
           gap: 8px 16px; padding: 8px 20px; background: #eef2f7; border-bottom: 1px solid #ccd; }
.filters input { width: 6em; }
.legend { display: flex; align-items: center; gap: 6px; font-size: 12px; }
.legend .bar { width: 140px; height: 12px; border: 1px solid #bbb;
               background: linear-gradient(to right, rgba(230,60,30,0), rgba(230,60,30,.85)); }
main { padding: 12px 20px; }
section.group { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 0 0 14px; padding: 10px 12px; }
section.group > h2 { font-size: 14px; margin: 0 0 8px; color: #444; font-weight: 600; }
.source { background: #e4ecf7; border-radius: 4px; padding: 1px 6px; }
.body { display: flex; gap: 14px; align-items: flex-start; flex-wrap: wrap; }
.media img { min-width: 160px; max-width: 320px; max-height: 360px; object-fit: contain; }
.media img, .media video { border: 1px solid #ccc; display: block; }
.media video { max-width: 320px; max-height: 320px; }
.media audio { width: 300px; display: block; }
.media .missing { color: #a00; font-size: 12px; }
.media .where { font-size: 11px; color: #777; word-break: break-all; max-width: 320px; }
.prompt { flex: 1; min-width: 260px; }
pre { white-space: pre-wrap; word-break: break-word; margin: 2px 0 8px; font: 13px/1.35 ui-monospace, monospace; }
table.completions { border-collapse: collapse; width: 100%; margin-top: 8px; font-size: 13px; }
table.completions th, table.completions td { border-top: 1px solid #eee; padding: 4px 6px; text-align: left;
                                             vertical-align: top; }
table.completions td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: #06743b; } .neg { color: #b3261e; }
.tokens { font: 12px/1.7 ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; color: #333; }
.tok { border-radius: 2px; }
.empty { color: #777; font-style: italic; }
"""

JS = """
(function () {
  var step = document.getElementById('f-step'), source = document.getElementById('f-source');
  var lo = document.getElementById('f-min'), hi = document.getElementById('f-max');
  var count = document.getElementById('f-count');
  function num(input) { var v = parseFloat(input.value); return isNaN(v) ? null : v; }
  function apply() {
    var a = num(lo), b = num(hi), shown = 0, groups = document.querySelectorAll('section.group');
    groups.forEach(function (g) {
      var ok = (step.value === '' || g.dataset.step === step.value) &&
               (source.value === '' || g.dataset.source === source.value);
      var rows = 0;
      g.querySelectorAll('tr.completion').forEach(function (row) {
        var r = row.dataset.reward === '' ? null : parseFloat(row.dataset.reward);
        var inside = (a === null && b === null) ||
                     (r !== null && (a === null || r >= a) && (b === null || r <= b));
        row.style.display = inside ? '' : 'none';
        if (inside) rows++;
      });
      ok = ok && rows > 0;
      g.style.display = ok ? '' : 'none';
      if (ok) shown++;
    });
    count.textContent = 'showing ' + shown + ' of ' + groups.length + ' groups';
  }
  [step, source, lo, hi].forEach(function (el) { el.addEventListener('input', apply);
                                                 el.addEventListener('change', apply); });
  apply();
})();
"""

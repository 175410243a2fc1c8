// The teacher's grid (templates/classroom/class_detail.html).
//
// static/js/live.js opens the grid's websocket (ws/classes/SLUG/,
// panel/classroom/consumers.py), keeps its status badges current and hands every
// message on as a "vpanel:live" event; here:
//
//   - `usage`: each seat's CPU (% of one core), memory (used / limit) and last
//     activity, every few seconds while the page is visible; a row the message
//     leaves out is no longer the user's (a TA's group taken away, a student
//     removed) and goes;
//   - `hidden`: a server the user may no longer see: its row goes;
//   - the "select all" box of the bulk actions.
//
// Texts go in through textContent only.
(function () {
  "use strict";

  var MIB = 1048576;

  function setCell(row, name, text) {
    var td = row.querySelector("[data-vp-usage='" + name + "']");
    if (td) {
      td.textContent = text;
    }
  }

  function known(value) {
    return value !== null && value !== undefined;
  }

  function showRow(row, r) {
    if (r.running === true) {
      setCell(row, "cpu", known(r.cpu) ? Number(r.cpu).toFixed(1) + " %" : "…");
      setCell(row, "memory", known(r.memory)
        ? (Number(r.memory) / MIB).toFixed(1) + " MiB / " + Number(r.memory_mb) + " MiB" : "…");
    } else {
      setCell(row, "cpu", "—");
      setCell(row, "memory", "—");
    }
    row.querySelectorAll("[data-vp-usage='cpu'], [data-vp-usage='memory']").forEach(function (td) {
      td.title = r.error || "";
    });
    setCell(row, "activity", r.activity || "—");
  }

  function boxes() {
    return document.querySelectorAll("#class-grid input[name='seats']");
  }

  // The "select all" box: ticked when every row is, half when some are.
  function selectAllState() {
    var all = document.querySelector("[data-vp-select-all]");
    if (!all) {
      return;
    }
    var rows = 0;
    var ticked = 0;
    boxes().forEach(function (box) {
      rows += 1;
      ticked += box.checked ? 1 : 0;
    });
    all.checked = rows > 0 && ticked === rows;
    all.indeterminate = ticked > 0 && ticked < rows;
  }

  function usage(msg) {
    var shown = {};
    (msg.rows || []).forEach(function (r) {
      shown[String(r.seat)] = true;
      var row = document.querySelector("tr[data-vp-seat='" + Number(r.seat) + "']");
      if (row) {
        showRow(row, r);
      }
    });
    document.querySelectorAll("tr[data-vp-seat]").forEach(function (row) {
      if (!shown[row.getAttribute("data-vp-seat")]) {
        row.remove();
      }
    });
    selectAllState();
  }

  document.addEventListener("vpanel:live", function (ev) {
    var msg = ev.detail || {};
    if (msg.type === "usage") {
      usage(msg);
    } else if (msg.type === "hidden" && msg.vserver) {
      var row = document.querySelector("tr[data-vp-seat][data-vp-vserver='" + Number(msg.vserver.id) + "']");
      if (row) {
        row.remove();
        selectAllState();
      }
    }
  });

  document.addEventListener("change", function (ev) {
    var target = ev.target;
    if (!(target instanceof Element)) {
      return;
    }
    if (target.matches("[data-vp-select-all]")) {
      boxes().forEach(function (box) { box.checked = target.checked; });
      target.indeterminate = false;
    } else if (target.matches("#class-grid input[name='seats']")) {
      selectAllState();
    }
  });
})();

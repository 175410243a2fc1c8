// vpanel's live pages: the websocket of the dashboard, of a vserver's page and of
// a class's grid (panel/guests/consumers.py, panel/classroom/consumers.py; the URL
// comes from the element [data-vp-live]).
// Everything here is on top of the server-rendered page, which stays right
// without it; with it, the page follows what happens without ever reloading:
//
//   - status badges and the vserver's fields (limits, hostname, status message);
//   - operations with their progress: the dashboard's "Operations in progress",
//     a vserver page's "Recent operations" (the same rows as
//     templates/includes/operations.html draws, from events.operation);
//   - the dashboard's usage bars against the plan (includes/usage_bars.html,
//     from plan_usage.plan_of);
//   - a vserver page's usage bars and process list, like vtop, while it is open
//     and visible (the panel samples the guest only while a page watches);
//   - what only the server can say (which actions this user may take now, and
//     their dialogs; a dashboard row for a new vserver): the regions marked
//     data-vp-refresh are fetched again and swapped in when that may have
//     changed. A fetch, not a reload: the window, its socket and whatever is
//     being typed stay.
//
// A page's own script hears every message too, as a "vpanel:live" event on the
// document (static/js/classroom.js: the grid's usage cells). What a page watches
// only while visible is named by data-vp-watch on [data-vp-live] ("usage": the
// grid's `watch-usage`), or is its process list (`watch-processes`).
//
// The process rows come from inside the guest: every text goes in through
// textContent, never as HTML, and control or direction-changing characters are
// shown escaped (\x1b, \u202e) rather than acted on.
(function () {
  "use strict";

  // Closes that mean "do not come back" (consumers.py): login, missing, bad, flood, deleted.
  var FINAL = { 4400: true, 4401: true, 4404: true, 4410: true, 4429: true };
  var BACKOFF_MIN = 1000;
  var BACKOFF_MAX = 30000;
  var DASHBOARD_OPERATIONS = 50; // events.DASHBOARD_OPERATIONS
  var MIB = 1048576;
  var GIB = 1073741824;

  var UNSAFE = /[\u0000-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

  function visible(text) {
    return String(text === null || text === undefined ? "" : text).replace(UNSAFE, function (c) {
      var code = c.charCodeAt(0);
      return code <= 0xff ? "\\x" + ("0" + code.toString(16)).slice(-2)
        : "\\u" + ("000" + code.toString(16)).slice(-4);
    });
  }

  function element(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) {
      e.className = cls;
    }
    if (text !== undefined && text !== null) {
      e.textContent = text;
    }
    return e;
  }

  function cell(text, cls) {
    return element("td", cls, text);
  }

  function size(bytes) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var n = Number(bytes) || 0;
    var i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function colour(word) {
    return String(word || "secondary").replace(/[^a-z-]/g, "");
  }

  function badge(cls, text) {
    return element("span", "badge text-bg-" + colour(cls), text);
  }

  function clamp(percent) {
    return Math.max(0, Math.min(100, Math.round(Number(percent) || 0)));
  }

  // A progress bar as the templates draw one: .progress[role=progressbar] > .progress-bar.
  function progress(label, percent, barClass, text) {
    var outer = element("div", "progress");
    outer.setAttribute("role", "progressbar");
    outer.setAttribute("aria-label", label);
    outer.setAttribute("aria-valuenow", String(clamp(percent)));
    outer.setAttribute("aria-valuemin", "0");
    outer.setAttribute("aria-valuemax", "100");
    var inner = outer.appendChild(element("div", "progress-bar" + (barClass ? " " + barClass : ""), text));
    inner.style.width = clamp(percent) + "%";
    return outer;
  }

  // --- a vserver: its badge and fields --------------------------------------------------

  function showVServer(vs) {
    var id = Number(vs.id);
    document.querySelectorAll("[data-vp-status='" + id + "']").forEach(function (el) {
      el.replaceChildren(badge(vs.badge, vs.status_display));
    });
    var scope = "[data-vp-vserver='" + id + "']";
    document.querySelectorAll(scope + "[data-vp-field], " + scope + " [data-vp-field]").forEach(function (el) {
      var name = el.getAttribute("data-vp-field");
      if (!Object.prototype.hasOwnProperty.call(vs, name)) {
        return;
      }
      var value = vs[name] === null || vs[name] === undefined ? "" : String(vs[name]);
      el.textContent = value;
      if (name === "status_message") {
        el.hidden = !value;
      }
    });
  }

  function showDeleted(id) {
    document.querySelectorAll("[data-vp-status='" + Number(id) + "']").forEach(function (el) {
      el.replaceChildren(badge("dark", "Deleted"));
    });
  }

  // --- operations ------------------------------------------------------------------------

  function operationRow(op, withVServer, vserverUrl) {
    var tr = element("tr");
    tr.setAttribute("data-vp-op", String(Number(op.id)));
    var when = element("time", null, op.created_display);
    when.setAttribute("datetime", op.created);
    tr.appendChild(element("td", "text-nowrap")).appendChild(when);
    if (withVServer) {
      var td = tr.appendChild(element("td"));
      if (op.vserver !== null && op.vserver !== undefined) {
        var a = td.appendChild(element("a", null, op.vserver_name));
        a.href = vserverUrl.replace(/\/0\/$/, "/" + Number(op.vserver) + "/");
      } else {
        td.textContent = op.vserver_name;
      }
    }
    tr.appendChild(cell(op.kind_display));
    tr.appendChild(element("td")).appendChild(badge(op.badge, op.state_display));
    tr.appendChild(element("td")).appendChild(progress(
      op.kind_display + " progress", op.progress,
      op.done ? "" : "progress-bar-striped progress-bar-animated", clamp(op.progress) + "%"));
    var msg = tr.appendChild(element("td", "small"));
    if (op.error) {
      msg.appendChild(element("span", "text-danger", op.error));
    } else {
      msg.textContent = op.message;
    }
    return tr;
  }

  function showOperations(tbody, ops) {
    var withVServer = tbody.getAttribute("data-vp-ops") === "dashboard";
    var url = tbody.getAttribute("data-vp-url-vserver") || "/vservers/0/";
    var rows = document.createDocumentFragment();
    ops.forEach(function (op) { rows.appendChild(operationRow(op, withVServer, url)); });
    if (!ops.length) {
      var empty = rows.appendChild(element("tr")).appendChild(
        cell(tbody.getAttribute("data-vp-ops-empty") || "No operations.", "text-body-secondary"));
      empty.colSpan = withVServer ? 6 : 5;
    }
    tbody.replaceChildren(rows);
  }

  function newestFirst(a, b) {
    return a.created < b.created ? 1 : a.created > b.created ? -1 : Number(b.id) - Number(a.id);
  }

  // --- the dashboard's usage against the plan ------------------------------------------

  function showPlan(plan) {
    var dl = document.querySelector("[data-vp-plan='" + Number(plan.customer) + "']");
    if (!dl || !plan.bars) {
      return; // not a section of this page (or no longer the user's: gone at the next load)
    }
    var rows = document.createDocumentFragment();
    plan.bars.forEach(function (bar) {
      var row = element("div", "usage-row");
      row.setAttribute("data-vp-bar", bar.key);
      var dt = row.appendChild(element("dt", "small fw-normal", bar.label + " "));
      dt.appendChild(element("span", "text-body-secondary", bar.used + " of " + bar.limit));
      row.appendChild(element("dd", "mb-2")).appendChild(progress(
        bar.label + ": " + bar.used + " of " + bar.limit, bar.percent, "bg-" + colour(bar.colour)));
      rows.appendChild(row);
    });
    dl.replaceChildren(rows);
  }

  // --- a vserver page's usage bars and process list ------------------------------------

  function Processes(section, limits) {
    this.section = section;
    this.rows = section.querySelector("[data-vp-proc-rows]");
    this.summary = section.querySelector("[data-vp-proc-summary]");
    this.usage = section.querySelector("[data-vp-proc-usage]");
    this.limits = limits; // () -> the vserver's snapshot: its limits
    this.last = null;
  }

  Processes.prototype.say = function (text) {
    this.summary.textContent = text;
  };

  Processes.prototype.bar = function (name, percent, text) {
    var bar = this.usage.querySelector("[data-vp-usage-bar='" + name + "']");
    if (!bar) {
      return;
    }
    var p = clamp(percent);
    bar.setAttribute("aria-valuenow", String(p));
    bar.firstElementChild.style.width = p + "%";
    // plan_usage's colours (hosting.views.bar_colour): amber from 75 %, red from 90 %.
    bar.firstElementChild.className = "progress-bar" + (p >= 90 ? " bg-danger" : p >= 75 ? " bg-warning" : "");
    this.usage.querySelector("[data-vp-usage-text='" + name + "']").textContent = text;
  };

  // The bars from the last sample, against the limits as they are now.
  Processes.prototype.bars = function () {
    var vs = this.limits();
    var msg = this.last;
    if (!vs || !msg || !msg.running || msg.error) {
      this.usage.hidden = true;
      return;
    }
    var u = msg.usage || {};
    var cores = parseFloat(vs.cpu_cores) || 0;
    var cpu = Number(u.cpu) || 0;
    var memory = u.memory !== null && u.memory !== undefined ? u.memory : u.rss || 0;
    var procs = Number(u.processes) || 0;
    this.usage.hidden = false;
    this.bar("cpu", cores > 0 ? cpu / cores : 0, cpu.toFixed(1) + "% of a CPU, of " + cores + " allowed");
    this.bar("memory", 100 * memory / (vs.memory_mb * MIB), size(memory) + " of " + vs.memory_mb + " MiB");
    this.bar("processes", 100 * procs / vs.processes, procs + " of " + vs.processes);
    if (u.disk === null || u.disk === undefined) {
      this.bar("disk", 0, "not measured on this host");
    } else {
      this.bar("disk", 100 * u.disk / (vs.disk_gb * GIB), size(u.disk) + " of " + vs.disk_gb + " GiB");
    }
  };

  Processes.prototype.show = function (msg) {
    this.last = msg;
    this.bars();
    if (msg.error) {
      this.say(msg.error);
      return;
    }
    if (!msg.running) {
      this.rows.replaceChildren();
      this.rows.appendChild(element("tr")).appendChild(
        cell("Not running.", "text-body-secondary")).colSpan = 6;
      this.say("Not running.");
      return;
    }
    var rows = document.createDocumentFragment();
    (msg.rows || []).forEach(function (r) {
      var tr = element("tr");
      tr.appendChild(cell(r.pid === null ? "?" : String(r.pid), "text-end font-monospace"));
      tr.appendChild(cell(visible(r.user)));
      tr.appendChild(cell(Number(r.cpu).toFixed(1), "text-end"));
      tr.appendChild(cell(Number(r.mem).toFixed(1), "text-end"));
      tr.appendChild(cell(size(r.rss), "text-end"));
      tr.appendChild(cell(visible(r.command), "font-monospace text-break"));
      rows.appendChild(tr);
    });
    this.rows.replaceChildren(rows);
    var shown = (msg.rows || []).length;
    this.say(msg.total + " process" + (msg.total === 1 ? "" : "es") +
      (shown < msg.total ? " (the busiest " + shown + " shown)" : "") +
      " · updated " + new Date((msg.ts || Date.now() / 1000) * 1000).toLocaleTimeString());
  };

  // --- regions the server renders again ------------------------------------------------

  function Regions(url, swapped) {
    this.url = url;
    this.swapped = swapped; // (the fetched document) after a swap
    this.wanted = {};
    this.busy = false;
    this.timer = null;
    var self = this;
    document.addEventListener("hidden.bs.modal", function () { self.schedule(0); });
  }

  Regions.prototype.want = function (names) {
    var self = this;
    names.forEach(function (n) {
      if (document.querySelector("[data-vp-refresh='" + n + "']")) {
        self.wanted[n] = true;
      }
    });
    this.schedule(0);
  };

  Regions.prototype.schedule = function (wait) {
    var self = this;
    if (this.timer === null && Object.keys(this.wanted).length) {
      this.timer = window.setTimeout(function () { self.timer = null; self.run(); }, wait);
    }
  };

  // Never under the user's hands: not while a dialog is open.
  Regions.prototype.blocked = function () {
    return Boolean(document.querySelector(".modal.show") || document.body.classList.contains("modal-open"));
  };

  Regions.prototype.run = function () {
    var self = this;
    if (this.busy) {
      return; // its end looks again
    }
    if (this.blocked()) {
      this.schedule(1000);
      return;
    }
    var names = Object.keys(this.wanted);
    this.wanted = {};
    this.busy = true;
    window.fetch(this.url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" } })
      .then(function (resp) { return resp.ok ? resp.text() : null; })
      .then(function (html) {
        if (html === null) {
          return; // gone, or the session ended: the socket says so
        }
        var doc = new DOMParser().parseFromString(html, "text/html");
        if (self.blocked()) {
          names.forEach(function (n) { self.wanted[n] = true; });
          return;
        }
        names.forEach(function (name) {
          var sel = "[data-vp-refresh='" + name + "']";
          var fresh = doc.querySelector(sel);
          var old = document.querySelector(sel);
          if (fresh && old) {
            var node = document.importNode(fresh, true);
            old.replaceWith(node);
            if (window.vpanel) {
              window.vpanel.bind(node);
            }
          }
        });
        self.swapped(doc);
      })
      .catch(function () { /* the next change tries again */ })
      .then(function () {
        self.busy = false;
        self.schedule(self.blocked() ? 1000 : 0);
      });
  };

  // --- the connection --------------------------------------------------------------------

  function Live(el) {
    var self = this;
    this.path = el.getAttribute("data-vp-live");
    this.pageVServer = el.hasAttribute("data-vp-page-vserver")
      ? Number(el.getAttribute("data-vp-page-vserver")) : null;
    this.renderedStatus = el.getAttribute("data-vp-rendered-status");
    this.vservers = {}; // id -> snapshot (a vserver page: its own, with `recent`)
    var section = document.querySelector("[data-vp-processes]");
    this.processes = section ? new Processes(section, function () {
      return self.vservers[self.pageVServer];
    }) : null;
    this.regions = new Regions(el.getAttribute("data-vp-page") || window.location.pathname,
      function (doc) { self.swapped(doc); });
    this.watchKind = this.processes ? "processes" : el.getAttribute("data-vp-watch");
    this.backoff = BACKOFF_MIN;
    this.ws = null;
    this.watching = false;
  }

  Live.prototype.url = function () {
    return (window.location.protocol === "https:" ? "wss://" : "ws://") + window.location.host + this.path;
  };

  Live.prototype.send = function (msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(msg));
    }
  };

  // Processes (a grid's usage) are watched only while the page is visible: a hidden
  // tab costs the host nothing.
  Live.prototype.watch = function () {
    if (!this.watchKind) {
      return;
    }
    var want = !document.hidden;
    if (want !== this.watching) {
      this.watching = want;
      this.send({ type: (want ? "watch-" : "unwatch-") + this.watchKind });
      if (want && this.processes) {
        this.processes.say("Waiting for the first sample…");
      }
    }
  };

  Live.prototype.connect = function () {
    var self = this;
    var ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = function () {
      self.backoff = BACKOFF_MIN;
      self.watching = false;
      self.watch();
    };
    ws.onmessage = function (ev) {
      var msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      self.handle(msg);
    };
    ws.onclose = function (ev) {
      self.ws = null;
      self.watching = false;
      if (FINAL[ev.code]) {
        if (self.processes) {
          self.processes.say("Not live: " + (ev.reason || "closed") + ". Reload the page.");
        }
        return;
      }
      // Jitter: a panel that restarts is not met by every page at the same instant.
      var wait = self.backoff * (0.5 + Math.random() / 2);
      self.backoff = Math.min(self.backoff * 2, BACKOFF_MAX);
      window.setTimeout(function () { self.connect(); }, wait);
    };
  };

  // The dashboard's operations under way: those of every vserver it knows.
  Live.prototype.showDashboardOperations = function () {
    var tbody = document.querySelector("[data-vp-ops='dashboard']");
    if (!tbody) {
      return;
    }
    var self = this;
    var ops = [];
    Object.keys(this.vservers).forEach(function (id) {
      (self.vservers[id].operations || []).forEach(function (op) { ops.push(op); });
    });
    ops.sort(newestFirst);
    showOperations(tbody, ops.slice(0, DASHBOARD_OPERATIONS));
    var section = tbody.closest("[data-vp-ops-section]");
    if (section) {
      section.hidden = !ops.length;
    }
  };

  // A vserver the dashboard should have a row for and has not, or a row of one it no
  // longer knows: its customer's table is fetched again.
  Live.prototype.checkRows = function (vs) {
    if (this.pageVServer !== null) {
      return;
    }
    if (!document.querySelector("tr[data-vp-vserver='" + Number(vs.id) + "']")) {
      this.regions.want(["customer-" + Number(vs.customer)]);
    }
  };

  Live.prototype.rowGone = function (id) {
    var row = document.querySelector("tr[data-vp-vserver='" + Number(id) + "']");
    var region = row && row.closest("[data-vp-refresh]");
    if (region) {
      this.regions.want([region.getAttribute("data-vp-refresh")]);
    }
  };

  Live.prototype.vserver = function (vs) {
    this.vservers[vs.id] = vs;
    showVServer(vs);
    if (this.pageVServer === null) {
      this.checkRows(vs);
      return;
    }
    if (Number(vs.id) !== this.pageVServer) {
      return;
    }
    var tbody = document.querySelector("[data-vp-ops='vserver']");
    if (tbody && vs.recent) {
      showOperations(tbody, vs.recent);
    }
    if (this.processes) {
      this.processes.bars(); // its limits may have changed
    }
    if (vs.status !== this.renderedStatus) {
      // Which actions this user may take follows the status: the server says which.
      this.regions.want(["actions", "dialogs", "overview", "audit"]);
    }
  };

  // After regions were swapped in: what the socket said since stands over what was fetched.
  Live.prototype.swapped = function (doc) {
    var fresh = doc.querySelector("[data-vp-rendered-status]");
    if (fresh) {
      this.renderedStatus = fresh.getAttribute("data-vp-rendered-status");
    }
    var self = this;
    Object.keys(this.vservers).forEach(function (id) { showVServer(self.vservers[id]); });
  };

  Live.prototype.handle = function (msg) {
    var self = this;
    switch (msg.type) {
      case "state":
        this.vservers = {};
        (msg.vservers || []).forEach(function (vs) { self.vserver(vs); });
        document.querySelectorAll("tr[data-vp-vserver]").forEach(function (row) {
          var id = row.getAttribute("data-vp-vserver");
          if (!self.vservers[id]) {
            showDeleted(id);
            self.rowGone(id);
          }
        });
        (msg.plans || []).forEach(showPlan);
        this.showDashboardOperations();
        break;
      case "vserver":
        this.vserver(msg.vserver);
        this.showDashboardOperations();
        break;
      case "deleted":
        if (msg.vserver) {
          delete this.vservers[msg.vserver.id];
          showDeleted(msg.vserver.id);
          this.rowGone(msg.vserver.id);
          this.showDashboardOperations();
        }
        break;
      case "plan":
        if (msg.plan) {
          showPlan(msg.plan);
        }
        break;
      case "processes":
        if (this.processes) {
          this.processes.show(msg);
        }
        break;
      default:
        break;
    }
    document.dispatchEvent(new CustomEvent("vpanel:live", { detail: msg }));
  };

  document.addEventListener("DOMContentLoaded", function () {
    var el = document.querySelector("[data-vp-live]");
    if (!el || !window.WebSocket) {
      return;
    }
    var live = new Live(el);
    window.vpanelLive = live; // for the browser test and the curious
    live.connect();
    document.addEventListener("visibilitychange", function () { live.watch(); });
  });
})();

// vpanel's live pages: the websocket of the dashboard and of a vserver's page
// (panel/guests/consumers.py; the URL comes from the element [data-vp-live]).
// Everything here is on top of the server-rendered page, which stays right
// without it: status badges follow the vserver's changes, and a vserver page
// shows its process list, like vtop, while it is open and visible.
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

  var UNSAFE = /[\u0000-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

  function visible(text) {
    return String(text === null || text === undefined ? "" : text).replace(UNSAFE, function (c) {
      var code = c.charCodeAt(0);
      return code <= 0xff ? "\\x" + ("0" + code.toString(16)).slice(-2)
        : "\\u" + ("000" + code.toString(16)).slice(-4);
    });
  }

  function cell(text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) {
      td.className = cls;
    }
    return td;
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

  // --- status badges ---------------------------------------------------------------

  function badge(vs) {
    var span = document.createElement("span");
    span.className = "badge text-bg-" + String(vs.badge || "secondary").replace(/[^a-z-]/g, "");
    span.textContent = vs.status_display;
    return span;
  }

  function showVServer(vs) {
    document.querySelectorAll("[data-vp-status='" + Number(vs.id) + "']").forEach(function (el) {
      el.replaceChildren(badge(vs));
    });
  }

  function showDeleted(id) {
    document.querySelectorAll("[data-vp-status='" + Number(id) + "']").forEach(function (el) {
      var span = document.createElement("span");
      span.className = "badge text-bg-dark";
      span.textContent = "Deleted";
      el.replaceChildren(span);
    });
  }

  // --- the process list ----------------------------------------------------------------

  function Processes(section, limits) {
    this.section = section;
    this.rows = section.querySelector("[data-vp-proc-rows]");
    this.summary = section.querySelector("[data-vp-proc-summary]");
    this.usage = section.querySelector("[data-vp-proc-usage]");
    this.limits = limits;
  }

  Processes.prototype.say = function (text) {
    this.summary.textContent = text;
  };

  Processes.prototype.bar = function (name, percent, text) {
    var bar = this.usage.querySelector("[data-vp-usage-bar='" + name + "']");
    var p = Math.max(0, Math.min(100, Math.round(percent)));
    bar.setAttribute("aria-valuenow", String(p));
    bar.firstElementChild.style.width = p + "%";
    bar.firstElementChild.className = "progress-bar" + (p >= 90 ? " bg-danger" : p >= 70 ? " bg-warning" : "");
    this.usage.querySelector("[data-vp-usage-text='" + name + "']").textContent = text;
  };

  Processes.prototype.show = function (msg) {
    var self = this;
    if (msg.error) {
      this.say(msg.error);
      return;
    }
    if (!msg.running) {
      this.rows.replaceChildren();
      this.rows.appendChild(document.createElement("tr")).appendChild(
        cell("Not running.", "text-body-secondary")).colSpan = 6;
      this.say("Not running.");
      this.usage.hidden = true;
      return;
    }
    var rows = document.createDocumentFragment();
    (msg.rows || []).forEach(function (r) {
      var tr = document.createElement("tr");
      tr.appendChild(cell(r.pid === null ? "?" : String(r.pid), "text-end font-monospace"));
      tr.appendChild(cell(visible(r.user)));
      tr.appendChild(cell(Number(r.cpu).toFixed(1), "text-end"));
      tr.appendChild(cell(Number(r.mem).toFixed(1), "text-end"));
      tr.appendChild(cell(size(r.rss), "text-end"));
      tr.appendChild(cell(visible(r.command), "font-monospace text-break"));
      rows.appendChild(tr);
    });
    this.rows.replaceChildren(rows);
    var u = msg.usage || {};
    var shown = (msg.rows || []).length;
    this.say(msg.total + " process" + (msg.total === 1 ? "" : "es") +
      (shown < msg.total ? " (the busiest " + shown + " shown)" : "") +
      " · updated " + new Date((msg.ts || Date.now() / 1000) * 1000).toLocaleTimeString());
    if (this.limits.cores > 0 && this.limits.memoryMb > 0) {
      this.usage.hidden = false;
      self.bar("cpu", (u.cpu || 0) / this.limits.cores,
        (u.cpu || 0).toFixed(1) + "% of a core, of " + this.limits.cores + " allowed");
      self.bar("memory", 100 * (u.rss || 0) / (this.limits.memoryMb * 1048576),
        size(u.rss || 0) + " of " + this.limits.memoryMb + " MiB");
    }
  };

  // --- the connection --------------------------------------------------------------------

  function Live(el) {
    this.path = el.getAttribute("data-vp-live");
    var section = document.querySelector("[data-vp-processes]");
    this.processes = section ? new Processes(section, {
      memoryMb: parseFloat(el.getAttribute("data-vp-memory-mb") || "0"),
      cores: parseFloat(el.getAttribute("data-vp-cpu-cores") || "0")
    }) : null;
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

  // Processes are watched only while the page is visible: a hidden tab costs the host nothing.
  Live.prototype.watch = function () {
    if (!this.processes) {
      return;
    }
    var want = !document.hidden;
    if (want !== this.watching) {
      this.watching = want;
      this.send({ type: want ? "watch-processes" : "unwatch-processes" });
      if (want) {
        this.processes.say("Waiting for the first list…");
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

  Live.prototype.handle = function (msg) {
    switch (msg.type) {
      case "state":
        (msg.vservers || []).forEach(showVServer);
        break;
      case "vserver":
        showVServer(msg.vserver);
        break;
      case "deleted":
        showDeleted(msg.vserver && msg.vserver.id);
        break;
      case "processes":
        if (this.processes) {
          this.processes.show(msg);
        }
        break;
      default:
        break;
    }
  };

  document.addEventListener("DOMContentLoaded", function () {
    var el = document.querySelector("[data-vp-live]");
    if (!el || !window.WebSocket) {
      return;
    }
    var live = new Live(el);
    live.connect();
    document.addEventListener("visibilitychange", function () { live.watch(); });
  });
})();

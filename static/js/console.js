// The console page (templates/guests/vserver_console.html): xterm.js on the panel's
// websocket ws/vservers/<pk>/console/ (panel/guests/console.py, docs/panel.md "Console").
//
// What is typed or pasted goes out as binary frames (UTF-8), the terminal's size as
// {"type": "resize", "cols", "rows"} whenever the fit addon changes it. Binary frames
// that come in are the shell's output; text frames are {"type": "exit", "code"} (the
// shell ended) and {"type": "closing", "code", "reason", "retry"?} (why the panel
// closes). A connection that drops without a word from the panel, or with "retry", is
// opened again a few times: the panel attaches it to the same shell, and the agent
// replays the recent output onto the emptied terminal.
(function () {
  "use strict";

  var box = document.getElementById("console");
  if (!box || !window.Terminal || !window.FitAddon) {
    return;
  }
  var statusLine = document.getElementById("console-status");
  var again = document.getElementById("console-again");
  var encoder = new TextEncoder();
  var RETRIES = 5;

  var term = new window.Terminal({
    cursorBlink: true,
    scrollback: 5000,
    fontSize: 14,
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace",
    theme: { background: "#000000" }
  });
  var fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();

  var ws = null;
  var retries = 0;

  function say(text, state) {
    statusLine.textContent = text;
    statusLine.setAttribute("data-state", state);
  }

  function capital(text) {
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  function offer(label) {
    again.textContent = label;
    again.hidden = false;
  }

  function send(data) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(data);
    }
  }

  function connect() {
    again.hidden = true;
    say(retries ? "Connection lost; connecting again…" : "Connecting…", "connecting");
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    var url = scheme + "//" + window.location.host + box.getAttribute("data-ws-path") +
      "?cols=" + term.cols + "&rows=" + term.rows;
    var socket = new WebSocket(url);
    var exited = null;
    var closing = null;
    socket.binaryType = "arraybuffer";
    ws = socket;

    var opened = 0;
    socket.onopen = function () {
      opened = Date.now();
      say("Connected", "open");
      term.focus();
    };
    socket.onmessage = function (event) {
      if (typeof event.data !== "string") {
        term.write(new Uint8Array(event.data));
        return;
      }
      var msg;
      try {
        msg = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      if (msg.type === "exit") {
        exited = msg;
      } else if (msg.type === "closing") {
        closing = msg;
      }
    };
    socket.onclose = function (event) {
      if (ws === socket) {
        ws = null;
      }
      if (opened && Date.now() - opened > 10000) {
        retries = 0; // it worked for a while: a new drop gets its full set of retries
      }
      if (exited) {
        var why = closing ? closing.reason : "the shell ended";
        var code = exited.code === null || exited.code === undefined ? "" :
          " (exit code " + exited.code + ")";
        say(capital(why) + code + ".", "exited");
        offer("New shell");
      } else if (closing && !closing.retry) {
        // The panel said why: a refusal, a logout, another window, the host's agent.
        // Nothing to retry alone (two windows would take the shell from each other).
        say(capital(closing.reason) + ".", closing.code === 4502 ? "lost" : "refused");
        offer(closing.code === 4001 ? "Take it back" : "Try again");
      } else if (retries < RETRIES) {
        // Dropped, or fell behind: attach again; the agent replays the screen.
        retries += 1;
        say("Connection lost; connecting again…", "reconnecting");
        window.setTimeout(function () {
          term.reset();
          connect();
        }, closing ? 0 : Math.min(1000 * retries, 5000));
      } else {
        say("The connection to the panel is lost (" + event.code + ").", "lost");
        offer("Reconnect");
      }
    };
  }

  term.onData(function (data) {
    send(encoder.encode(data));
  });
  // Some mouse reports are bytes, not text: one byte per character, as xterm.js documents.
  term.onBinary(function (data) {
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i += 1) {
      bytes[i] = data.charCodeAt(i) & 255;
    }
    send(bytes);
  });
  term.onResize(function (size) {
    send(JSON.stringify({ type: "resize", cols: size.cols, rows: size.rows }));
  });

  var pending = null;
  function refit() {
    window.clearTimeout(pending);
    pending = window.setTimeout(function () {
      fit.fit();
    }, 100);
  }
  window.addEventListener("resize", refit);
  if (window.ResizeObserver) {
    new window.ResizeObserver(refit).observe(box);
  }

  again.addEventListener("click", function () {
    retries = 0;
    term.reset();
    connect();
  });

  // For the browser test and the curious: the terminal, its text, the socket.
  window.vpanelConsole = {
    term: term,
    socket: function () {
      return ws;
    },
    text: function () {
      var buffer = term.buffer.active;
      var lines = [];
      for (var i = 0; i < buffer.length; i += 1) {
        lines.push(buffer.getLine(i).translateToString(true));
      }
      return lines.join("\n");
    }
  };

  connect();
})();
